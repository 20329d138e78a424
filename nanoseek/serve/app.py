"""The FastAPI app: routes, auth, error bodies, and the model's lifecycle.

`create_app` takes a ready Engine or AsyncLLM (tests, embedding) or a zero-argument loader
that builds one; a loader runs on a thread once the app starts, so the port answers
/health with 503 while the weights load instead of refusing connections.
"""

import contextlib
import logging
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.engine import AsyncLLM, Engine
from nanoseek.errors import NanoseekError
from nanoseek.serve import handlers, metrics
from nanoseek.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from nanoseek.serve.state import ServerState

log = logging.getLogger("nanoseek.serve")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_QUEUED_REQUESTS = 1024


def _as_llm(obj):
    """Engine -> a new AsyncLLM that the app owns; anything else is used as given."""
    return (AsyncLLM(obj), True) if isinstance(obj, Engine) else (obj, False)


def _field_path(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages.0.content': pydantic appends the
    union member it tried (a type name) to the location, which is noise to a client."""
    parts = []
    for x in loc:
        if x == "body" and not parts:
            continue
        if isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "none", "dict", "list")
                                   or x[:1].isupper()):
            break
        parts.append(str(x))
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's error list -> one OpenAI error naming the first bad field."""
    errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = errors[0]
    kind = first.get("type", "")
    param = _field_path(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON ({detail})".replace(" ()", ""), code="invalid_json")
    if param is None and kind in ("model_attributes_type", "missing", "dict_type"):
        return APIError(400, "request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    code = "missing_required_parameter" if kind == "missing" else \
        "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") else "invalid_value"
    msg = first.get("msg", "invalid")
    if sum(_field_path(e.get("loc", ())) == param for e in errors) > 1:  # no member of a union matched
        msg = f"wrong type ({msg}, or another of the accepted types)"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code=code)


def create_app(engine_or_llm, model_name: str, api_key: str | None = None,
               max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS) -> FastAPI:
    """engine_or_llm: an Engine, an AsyncLLM, or a zero-argument callable returning either."""
    state = ServerState(model_name, api_key, max_queued_requests)
    loader = None
    if callable(engine_or_llm) and not isinstance(engine_or_llm, (Engine, AsyncLLM)):
        loader = engine_or_llm
    else:
        state.llm, state.owns_llm = _as_llm(engine_or_llm)

    def load():
        try:
            llm, owns = _as_llm(loader())
            state.owns_llm = owns
            state.llm = llm  # last: /health turns 200 only when everything is set
            log.info("model %s loaded; ready", model_name)
        except Exception as e:
            state.load_error = str(e) if isinstance(e, NanoseekError) else f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", state.load_error)
            if app.state.on_load_error is not None:
                app.state.on_load_error(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if loader is not None and state.llm is None and state.load_error is None:
            threading.Thread(target=load, name="nanoseek-load", daemon=True).start()
        yield
        if state.llm is not None and state.owns_llm:
            state.llm.shutdown()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.state.on_load_error = None  # the CLI sets this to stop the process

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(NanoseekError)
    async def engine_rejected(request, exc: NanoseekError):
        # the engine's own checks (token ids, lengths, sampling values) name what is wrong
        return JSONResponse(APIError(400, str(exc), code="invalid_request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # Starlette re-raises after this, so uvicorn still logs the traceback
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def authorize(request: Request):
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != state.api_key:
            raise APIError(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    # ---- OpenAI API ------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(req: ChatCompletionRequest, request: Request):
        return await handlers.chat_completions(state, req, request)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def complete(req: CompletionRequest, request: Request):
        return await handlers.completions(state, req, request)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        # 503 until loaded, like /health: scripts written for vLLM poll /v1/models for readiness
        llm = state.require_llm()
        card = {"id": model_name, "object": "model", "created": state.created, "owned_by": "nanoseek",
                "max_model_len": handlers.context_limit(llm.engine)}
        return {"object": "list", "data": [card]}

    # ---- operations ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if state.llm is None:
            status = {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        if state.llm is None:
            return PlainTextResponse("# model not loaded yet\n", status_code=503, media_type=metrics.CONTENT_TYPE)
        text = metrics.render(state.llm.engine, model_name, dict(state.finished))
        return PlainTextResponse(text, media_type=metrics.CONTENT_TYPE)

    # ---- chat page -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
