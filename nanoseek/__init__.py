"""nanoseek: a hackable full-stack toolkit for DeepSeek-style reasoning language models."""

from nanoseek.config import ModelConfig
from nanoseek.engine import LLM, AsyncLLM
from nanoseek.errors import NanoseekError
from nanoseek.loading import load
from nanoseek.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "ModelConfig", "NanoseekError", "SamplingParams", "load"]
__version__ = "0.1.0"
