"""POST /v1/chat/completions and /v1/completions: request -> engine requests -> JSON or SSE.

Every check that can fail (model name, unsupported fields, context length, queue) runs
before anything is sent, so a bad request is a clean 4xx/503 and never a broken stream.
"""

import asyncio
import contextlib
import functools

from starlette.requests import Request
from starlette.responses import StreamingResponse

from nanoseek.errors import NanoseekError
from nanoseek.serve import responses as R
from nanoseek.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from nanoseek.serve.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning
from nanoseek.serve.state import ServerState, merge

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator.

    Starlette stops iterating when the client disconnects but leaves the generator to the
    garbage collector; closing it here runs its `finally`, which aborts the engine request.
    """

    media_type = "text/event-stream"

    def __init__(self, content, gens: list):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gens = gens

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            for g in self.gens:  # in case the body never started: release their admission
                await g.aclose()


class Aborted(Exception):
    """The engine aborted a request that the client still wanted (server shutdown)."""


# ---- shared checks ------------------------------------------------------------------------
def check_model(state: ServerState, model: str):
    if model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist (this server serves `{state.model_name}`)",
                       param="model", code="model_not_found")


def context_limit(engine) -> int:
    return min(engine.max_model_len, engine.blocks.num_blocks * engine.block_size)


def resolve_max_tokens(engine, prompt_len: int, requested: int | None, default: int | None, param: str) -> int:
    """The request's max_tokens, defaulted and checked against the context the way the engine will."""
    limit = context_limit(engine)
    if requested is None:
        room = limit - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{prompt_len} tokens, which leaves no room for a completion.",
                           param=param, code="context_length_exceeded")
        return room if default is None else min(default, room)
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                            f"completion). Please reduce the length of the prompt or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_params(req, max_tokens: int, logprobs: int | None):
    try:
        return req.sampling_params(max_tokens, logprobs)
    except NanoseekError as e:  # a value pydantic let through but the sampler refuses
        raise APIError(400, str(e), code="invalid_value") from None


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id], skip_special_tokens=False)


def prompt_tail(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids[-16:], skip_special_tokens=False)
    except Exception:  # a tokenizer without special-token handling: no think detection
        return ""


async def collect(request: Request, gens: list) -> list:
    """Run gens to completion -> their final outputs; abort them all if the client goes away."""
    finals = [None] * len(gens)

    async def run():
        async for i, out in merge(gens):
            finals[i] = out

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(run()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            t.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
        for g in gens:
            await g.aclose()
    if not work.done() or work.cancelled():
        raise APIError(499, "client closed the request", code="client_closed")
    work.result()  # re-raise an engine failure
    if any(o.finish_reason == "abort" for f in finals for o in f.outputs):
        raise APIError(503, "the request was aborted because the server is shutting down", "server_error",
                       code="aborted")
    return finals


def stream_error(e: Exception) -> str:
    if isinstance(e, Aborted):
        err = APIError(503, "the request was aborted because the server is shutting down", "server_error",
                       code="aborted")
    elif isinstance(e, APIError):
        err = e
    elif isinstance(e, NanoseekError):  # the engine refused the request
        err = APIError(400, str(e), code="invalid_request")
    else:
        err = APIError(500, f"generation failed: {e}", "server_error", code="internal_error")
    return R.sse(err.body())


class ChoiceCursor:
    """How much of one sample has been streamed: characters, tokens (for logprobs), reasoning state."""

    def __init__(self, in_reasoning: bool = False):
        self.chars = self.tokens = self.offset = 0
        self.splitter = ReasoningSplitter(in_reasoning)
        self.done = False

    def next_text(self, o) -> str:
        piece = o.text[self.chars:]
        self.chars = len(o.text)
        return piece

    def next_logprobs(self, o) -> list[dict]:
        # o.logprobs may grow on the engine thread; token_ids is this snapshot's length
        new = o.logprobs[self.tokens:len(o.token_ids)] if o.logprobs is not None else []
        self.tokens = len(o.token_ids)
        return new


# ---- chat ----------------------------------------------------------------------------------
async def chat_completions(state: ServerState, req: ChatCompletionRequest, request: Request):
    llm = state.require_llm()
    check_model(state, req.model)
    req.check_supported()
    engine, tok = llm.engine, llm.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; send token ids to /v1/completions",
                       param="messages")
    try:
        ids = tok.apply_chat_template(req.conversation(), add_generation_prompt=True, **(req.chat_template_kwargs or {}))
    except APIError:
        raise
    except Exception as e:  # jinja errors, e.g. "roles must alternate"
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages", code="invalid_messages") from None
    if isinstance(ids, str):
        ids = tok.encode(ids)
    max_tokens = resolve_max_tokens(engine, len(ids), req.requested_max_tokens, None, "messages")
    params = sampling_params(req, max_tokens, req.num_logprobs)
    state.admit(1)
    think = prompt_opens_think(prompt_tail(tok, ids))
    rid, created = R.new_id("chatcmpl"), R.now()
    gen = state.generate(llm, ids, params, rid)
    if req.stream:
        return SSEResponse(chat_stream(state, req, tok, gen, rid, created, len(ids), think), [gen])
    (final,) = await collect(request, [gen])
    choices = []
    for o in final.outputs:
        reasoning, content = split_reasoning(o.text, think)
        lp = R.chat_logprobs(functools.partial(token_text, tok), o.logprobs[:len(o.token_ids)]) \
            if req.logprobs else None
        choices.append({"index": o.index, "message": R.chat_message(content, reasoning), "logprobs": lp,
                        "finish_reason": o.finish_reason})
    use = R.usage(len(ids), sum(len(o.token_ids) for o in final.outputs), final.cached_tokens)
    return R.chat_response(rid, created, state.model_name, choices, use)


async def chat_stream(state, req, tok, gen, rid, created, prompt_len, think):
    model, text_of = state.model_name, functools.partial(token_text, tok)
    cursors = [ChoiceCursor(think) for _ in range(req.n)]
    final = None
    try:
        for i in range(req.n):
            yield R.sse(R.chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}))
        async with contextlib.aclosing(gen):
            async for out in gen:
                final = out
                for o in out.outputs:
                    cur = cursors[o.index]
                    if cur.done:
                        continue
                    if o.finish_reason == "abort":
                        raise Aborted()
                    reasoning, content = cur.splitter.feed(cur.next_text(o))
                    if o.finish_reason:
                        r2, c2 = cur.splitter.flush()
                        reasoning, content = reasoning + r2, content + c2
                        cur.done = True
                    new_lp = cur.next_logprobs(o) if req.logprobs else []
                    delta = {}
                    if reasoning:
                        delta["reasoning_content"] = reasoning
                    if content:
                        delta["content"] = content
                    if delta or new_lp or o.finish_reason:
                        lp = R.chat_logprobs(text_of, new_lp) if req.logprobs else None
                        yield R.sse(R.chat_chunk(rid, created, model, o.index, delta, o.finish_reason, lp))
        if req.include_usage and final is not None:
            use = R.usage(prompt_len, sum(len(o.token_ids) for o in final.outputs), final.cached_tokens)
            yield R.sse(R.usage_chunk(rid, created, model, "chat.completion.chunk", use))
    except Exception as e:  # headers are sent: the failure travels as an SSE error event
        yield stream_error(e)
    yield R.SSE_DONE


# ---- completions ---------------------------------------------------------------------------
def completion_prompt_ids(engine, req: CompletionRequest) -> list[list[int]]:
    tok, vocab = engine.tokenizer, engine.model.config.vocab_size
    out = []
    for p in req.prompts():
        if isinstance(p, str):
            if tok is None:
                raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            ids = tok.encode(p)
        else:
            ids = list(p)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt",
                               code="invalid_value")
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        out.append(ids)
    return out


async def completions(state: ServerState, req: CompletionRequest, request: Request):
    llm = state.require_llm()
    check_model(state, req.model)
    req.check_supported()
    engine = llm.engine
    prompts = completion_prompt_ids(engine, req)
    params = [sampling_params(req, resolve_max_tokens(engine, len(ids), req.max_tokens,
                                                       COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt"), req.logprobs)
              for ids in prompts]
    state.admit(len(prompts))
    rid, created = R.new_id("cmpl"), R.now()
    gens = [state.generate(llm, ids, p, f"{rid}-{i}") for i, (ids, p) in enumerate(zip(prompts, params))]
    if req.stream:
        return SSEResponse(completion_stream(state, req, engine.tokenizer, gens, rid, created,
                                             sum(len(ids) for ids in prompts)), gens)
    finals = await collect(request, gens)
    text_of = functools.partial(token_text, engine.tokenizer)
    choices = []
    for i, final in enumerate(finals):
        for o in final.outputs:
            lp = R.completion_logprobs(text_of, o.logprobs[:len(o.token_ids)], 0) if req.logprobs is not None else None
            choices.append({"index": i * req.n + o.index, "text": o.text, "logprobs": lp,
                            "finish_reason": o.finish_reason})
    use = R.usage(sum(len(ids) for ids in prompts),
                  sum(len(o.token_ids) for f in finals for o in f.outputs), sum(f.cached_tokens for f in finals))
    return R.completion_response(rid, created, state.model_name, choices, use)


async def completion_stream(state, req, tok, gens, rid, created, prompt_tokens):
    model, text_of = state.model_name, functools.partial(token_text, tok)
    cursors = {}
    finals = [None] * len(gens)
    try:
        async with contextlib.aclosing(merge(gens)) as outs:
            async for i, out in outs:
                finals[i] = out
                for o in out.outputs:
                    index = i * req.n + o.index
                    cur = cursors.setdefault(index, ChoiceCursor())
                    if cur.done:
                        continue
                    if o.finish_reason == "abort":
                        raise Aborted()
                    piece = cur.next_text(o)
                    cur.done = o.finish_reason is not None
                    lp = None
                    if req.logprobs is not None:
                        lp = R.completion_logprobs(text_of, cur.next_logprobs(o), cur.offset)
                        cur.offset += sum(len(t) for t in lp["tokens"])
                    if piece or (lp and lp["tokens"]) or o.finish_reason:
                        yield R.sse(R.completion_chunk(rid, created, model, index, piece, o.finish_reason, lp))
        if req.include_usage:
            use = R.usage(prompt_tokens, sum(len(o.token_ids) for f in finals for o in f.outputs),
                          sum(f.cached_tokens for f in finals))
            yield R.sse(R.usage_chunk(rid, created, model, "text_completion", use))
    except Exception as e:
        yield stream_error(e)
    yield R.SSE_DONE
