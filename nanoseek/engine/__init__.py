from nanoseek.engine.engine import Engine
from nanoseek.engine.llm import LLM, AsyncLLM
from nanoseek.engine.outputs import CompletionOutput, RequestOutput

__all__ = ["Engine", "LLM", "AsyncLLM", "CompletionOutput", "RequestOutput"]
