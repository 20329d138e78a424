"""`nanoseek serve`: an OpenAI-compatible HTTP server over the engine, with a chat page.

create_app(engine_or_llm, model_name, ...) builds the FastAPI app (usable in tests without
a port); add_serve_parser(subparsers) mounts the CLI; `python -m nanoseek.serve` runs it.
"""

from nanoseek.serve.cli import add_serve_parser


def create_app(*args, **kwargs):
    from nanoseek.serve.app import create_app as _create_app  # fastapi imports only when used
    return _create_app(*args, **kwargs)


__all__ = ["add_serve_parser", "create_app"]
