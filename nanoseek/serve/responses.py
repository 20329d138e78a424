"""The OpenAI wire format for answers: response, chunk, usage and logprobs dicts.

Pure functions of engine outputs, so the shapes can be read (and tested) in one place.
"""

import json
import time
import uuid

# JSON has no -inf; a token the sampler could never pick still needs a finite number
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(obj) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _lp(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


def chat_logprobs(token_text, entries: list[dict]) -> dict:
    """Engine logprob entries -> chat `logprobs` ({"content": [...]}). token_text: id -> str."""
    def item(tid, lp):
        s = token_text(tid)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}
    return {"content": [dict(item(e["token_id"], e["logprob"]),
                             top_logprobs=[item(t, lp) for t, lp in e["top"]]) for e in entries]}


def completion_logprobs(token_text, entries: list[dict], text_offset: int) -> dict:
    """Engine logprob entries -> legacy completions `logprobs` (parallel lists)."""
    tokens, offsets = [], []
    for e in entries:
        s = token_text(e["token_id"])
        tokens.append(s)
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": [_lp(e["logprob"]) for e in entries],
            "top_logprobs": [{token_text(t): _lp(lp) for t, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def chat_message(content: str, reasoning: str | None) -> dict:
    msg = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return msg


def chat_response(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish_reason=None,
               logprobs=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_response(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason=None,
                     logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
