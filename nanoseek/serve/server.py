"""Run the app under uvicorn: open the port first, load the model behind it, drain on SIGTERM.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections at once; requests already
running may finish until `shutdown_timeout`, when whatever is left is aborted (streams end
with an error event and [DONE], other requests get a 503) and the engine thread stops.
"""

import asyncio
import logging
import sys

import uvicorn

from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.serve.app import create_app

log = logging.getLogger("nanoseek.serve")


def load_model(path, precision: str):
    """(model, tokenizer) for a path, repo id or None (the embedded default). Tests replace this."""
    from nanoseek.loading import load
    return load(path, precision)


class Server(uvicorn.Server):
    """uvicorn's server plus a deadline: on the first exit signal in-flight requests get
    `shutdown_timeout` seconds, then they are aborted so their connections can close."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.loop = None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame):
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self.loop is not None:
            # we are in a signal handler: hand the work to the loop instead of doing it here
            self.loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self):
        state = self.config.app.state.serve
        state.draining = True
        log.info("shutting down: %d request(s) in flight, aborting any left after %.1fs",
                 len(state.inflight), self.shutdown_timeout)
        self.loop.call_later(self.shutdown_timeout, state.abort_all)


def build_app(args):
    """The app for parsed `nanoseek serve` arguments; it loads the model (at --precision,
    quantized on load for int8 / int8-dynamic / int4 / fp8) on a thread once it starts."""
    engine_kwargs = dict(max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                         kv_cache_gib=args.kv_cache_gib)

    def loader():
        model, tokenizer = load_model(args.model_path, args.precision)
        return Engine(model, tokenizer, **engine_kwargs)

    return create_app(loader, args.served_model_name, api_key=args.api_key,
                      max_queued_requests=args.max_queued_requests)


def serve(args):
    """Run the server described by parsed `nanoseek serve` arguments until it is stopped.

    Raises NanoseekError when the model fails to load (the port was already open by then).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = build_app(args)
    # the engine deadline comes first; uvicorn's own (which cancels handlers outright) is a backstop
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5, lifespan="on")
    server = Server(config, args.shutdown_timeout)

    def on_load_error(message):
        server.should_exit = True  # main_loop notices within 0.1 s

    app.state.on_load_error = on_load_error
    print(f"nanoseek serve: http://{args.host}:{args.port} (model {args.served_model_name}; "
          f"loading in the background, GET /health turns 200 when ready)", file=sys.stderr, flush=True)
    server.run()
    if app.state.serve.load_error:
        raise NanoseekError(f"model failed to load: {app.state.serve.load_error}")
