"""What the engine hands back: per-sample outputs grouped by request (vLLM's shape)."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None          # stop | length | abort
    logprobs: list[dict] | None = None        # per token: {"token_id", "logprob", "top": [(id, lp), ...]}
    stop_reason: str | int | None = None      # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    cached_tokens: int = 0                    # prompt tokens served from the prefix cache
