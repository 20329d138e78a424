"""The inference engine: continuous batching under a token budget over a paged KV cache.

Every `step()`:
  1. schedule: running sequences first (a decode needs 1 token, an unfinished prefill the
     rest of its prompt), then waiting ones in arrival order, until `max_batch_tokens` or
     `max_num_seqs` is reached; a prompt that does not fit the remaining budget is chunked.
     When the KV pool runs dry, the newest running sequence is preempted (its blocks
     freed, recomputed later from prompt + output so far); nothing is dropped. A new
     prompt is admitted only while the pool could still hold all of it and a reserve is
     left for the running sequences to grow into: a watermark (1% of the blocks, as vLLM
     keeps), and at least one block per running sequence (each needs its next block within
     block_size steps). Without that reserve, a flood of requests is admitted as far as
     their first chunks fit, and the running ones then preempt each other over and over
     (300 requests into a 200-block pool: 230 preemptions without it, 94 with it;
     bench/admission.py).
  2. run the model once over all scheduled tokens, flattened into one row;
  3. sample a token for every sequence whose scheduled tokens reached its end, apply stop
     rules, and report new text.
Requests may be added or aborted between steps.
"""

import itertools
import time
from collections import deque

import torch

from nanoseek.cpu_heap import keep_freed_memory
from nanoseek.engine import native
from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.flat_decode import FlatDecoder
from nanoseek.engine.metrics import EngineMetrics
from nanoseek.engine.outputs import CompletionOutput, RequestOutput
from nanoseek.engine.paged_attention import PagedAttention, PagedKVCache, kv_bytes_per_token
from nanoseek.errors import NanoseekError
from nanoseek.model.packing import pack_projections
from nanoseek.sampling import SamplingParams, apply_penalties, sample_row, top_logprobs


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum: the compiled loop's argmax_rows on a CPU (~0.1 ms for 32 rows of
    49,152, where torch's max(-1) takes ~0.9), else max(-1).indices (argmax's first-maximum rule,
    at a third of argmax's time on a CPU)."""
    mod = native.module() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    return mod.argmax_rows(logits) if mod is not None else logits.max(-1).indices


class Sequence:
    """One sample of one request: prompt + output tokens and its place in the KV cache."""

    def __init__(self, request_id, index, prompt_ids, params: SamplingParams, arrival):
        self.request_id, self.index, self.params = request_id, index, params
        self.prompt_ids, self.output_ids = list(prompt_ids), []
        self.table, self.hashes, self.num_computed = [], [], 0
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)
        self.arrival, self.first_token_time, self.last_token_time = arrival, None, None
        self.text, self.finish_reason, self.stop_reason = "", None, None
        # incremental detokenization (as vLLM does): text of ids[prefix:read] is already in self.text
        self.prefix_offset = self.read_offset = 0
        self.logprobs = [] if params.logprobs is not None else None
        self.cached_tokens = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    def __init__(self, request_id, prompt, prompt_ids, seqs):
        self.request_id, self.prompt, self.prompt_ids, self.seqs = request_id, prompt, prompt_ids, seqs

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class Engine:
    def __init__(self, model, tokenizer, max_batch_tokens: int = 4096, max_num_seqs: int = 256,
                 kv_cache_gib: float | None = 1.0, num_blocks: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, watermark: float | None = 0.01):
        self.model, self.tokenizer = model.eval(), tokenizer
        if model.device.type == "cpu":
            keep_freed_memory()  # a prefill's activations would otherwise be page-faulted anew each step
            # the compiled decode loop's one-time build (30-70 s) here, not inside a first request
            # that a client may time out on (the server builds engines while /health says 503)
            native.module()
        pack_projections(model)  # q/k/v and gate/up as one matmul each (tensors shared, nothing copied)
        self.flat = None  # decode steps without module dispatch, where the model allows (flat_decode.py)
        cfg = model.config
        if num_blocks is None:
            per_block = kv_bytes_per_token(cfg, model.dtype) * block_size
            # never more than every sequence at full context could use
            cap = max_num_seqs * -(-cfg.max_seq_len // block_size)
            num_blocks = max(min(int(kv_cache_gib * 2**30 // per_block), cap), 1)
        self.max_batch_tokens, self.max_num_seqs, self.block_size = max_batch_tokens, max_num_seqs, block_size
        self.max_model_len = cfg.max_seq_len
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        # admission reserve (see the module docstring); watermark None: none at all, admit as far
        # as a prompt's first chunk fits (the behaviour the reserve replaced, kept for comparison)
        self.reserve = watermark is not None
        self.watermark_blocks = max(int(watermark * num_blocks), 1) if watermark else 0
        self.cache = PagedKVCache(cfg, num_blocks, block_size, model.dtype, model.device)
        eos = set(cfg.eos_token_id)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_ids = eos
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        # the AsyncLLM whose thread steps this engine, if any: an engine has one driver, since
        # a second loop would step it concurrently and take the first one's outputs
        self.driver = None

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise NanoseekError(f"request {request_id!r}: id already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise NanoseekError("a text prompt needs a tokenizer; pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise NanoseekError(f"request {request_id!r}: empty prompt")
        vocab = self.model.config.vocab_size
        if any(not (0 <= t < vocab) for t in ids):
            raise NanoseekError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
        limit = min(self.max_model_len, self.blocks.num_blocks * self.block_size)
        if len(ids) + params.max_tokens > limit:
            raise NanoseekError(f"request {request_id!r}: prompt ({len(ids)} tokens) + max_tokens "
                                f"({params.max_tokens}) = {len(ids) + params.max_tokens} exceeds the "
                                f"context limit of {limit} tokens")
        now = time.monotonic()
        seqs = [Sequence(request_id, i, ids, params, now) for i in range(params.n)]
        self.requests[request_id] = Request(request_id, text, ids, seqs)
        self.waiting.extend(seqs)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request at any point; its KV blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            if s in self.running:
                self.running.remove(s)
            elif s in self.waiting:
                self.waiting.remove(s)
            self.blocks.release(s.table)
            if not s.finished:
                s.finish_reason = "abort"
        self.metrics.requests_aborted += 1
        return self._output(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache, as after a weight update (an RL step, a new adapter): cached
        blocks hold keys the old weights computed. Like vLLM, False (nothing dropped) while
        requests are in flight, whose blocks were computed with the old weights too."""
        return not self.has_unfinished() and self.blocks.reset_prefix_cache()

    # ---- scheduling -----------------------------------------------------------------------
    def _preempt(self, seq: Sequence):
        self.blocks.release(seq.table)
        seq.hashes.clear()
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.metrics.preemptions += 1

    def _schedule(self) -> list[tuple[Sequence, int]]:
        budget, scheduled, preempted = self.max_batch_tokens, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.allocate(seq.table, seq.num_computed + n):
                victim = self.running.pop()  # newest first: oldest requests keep making progress
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.table:
                seq.num_computed, seq.hashes = self.blocks.match_prefix(seq.tokens, seq.table)
                seq.cached_tokens = seq.num_computed
            n = min(seq.num_tokens - seq.num_computed, budget)
            # the whole prompt and a first output token must fit, with the reserve to spare
            # (an idle engine admits whatever fits: nothing else could free blocks for it)
            short = (self.reserve and self.running and
                     self.blocks.num_free - self.blocks.blocks_needed(seq.table, seq.num_tokens + 1)
                     < max(self.watermark_blocks, len(self.running)))
            if short or not self.blocks.allocate(seq.table, seq.num_computed + n):
                self.blocks.release(seq.table)  # give back prefix hits too; retried next step
                seq.hashes, seq.num_computed = [], 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    # ---- one step -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self._schedule()
        if not scheduled:
            return []
        ids, pos, ctx, rows, to_sample = [], [], [], [], []
        for seq, n in scheduled:
            start = seq.num_computed
            ids.extend(seq.tokens[start:start + n])
            pos.extend(range(start, start + n))
            ctx.append((seq.table, start, n))
            if start + n == seq.num_tokens:
                rows.append(len(ids) - 1)
                to_sample.append(seq)
        dev = self.model.device
        attn = PagedAttention(self.cache, ctx)
        h, head = self._forward(torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), attn)
        logits = head(h[0, rows]) if rows else None
        for seq, n in scheduled:
            if seq.num_computed < len(seq.prompt_ids):
                self.metrics.prompt_tokens += min(n, len(seq.prompt_ids) - seq.num_computed)
            seq.num_computed += n
            self.blocks.register_full_blocks(seq.tokens, seq.table, seq.hashes, seq.num_computed)
        now = time.monotonic()
        touched = {}
        # plain greedy rows (no penalty, nothing banned): one argmax for all of them, not one a row
        plain = [row for row, seq in enumerate(to_sample) if self._plain_greedy(seq)]
        picks = {}
        if plain:
            picks = dict(zip(plain, _argmax(logits if len(plain) == len(to_sample) else logits[plain]).tolist()))
        for row, seq in enumerate(to_sample):
            self._append_token(seq, logits[row], now, picks.get(row))
            touched[seq.request_id] = self.requests[seq.request_id]
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            self.blocks.release(seq.table)
        outs = []
        for rid, req in touched.items():
            outs.append(self._output(req))
            if req.finished:
                del self.requests[rid]
                self.metrics.requests_finished += 1
                self.metrics.e2e.observe(now - req.seqs[0].arrival)
        return outs

    def _forward(self, ids, pos, attn):
        """The model's forward for this step, as (hidden states, the function from them to logits):
        through the flat loop when it can run this model (checked every step: modules may have been
        swapped since) and the step is all decodes or its compiled form takes the step, else the
        modules."""
        if self.flat is None or not self.flat.current():
            self.flat = FlatDecoder.of(self.model)
        if self.flat is not None and (attn.all_decode or self.flat.compiled(self.cache.k[0].dtype, ids.shape[1], attn)):
            return self.flat.hidden_states(ids, pos, attn), self.flat.logits
        return self.model.hidden_states(ids, pos, attn), self.model.logits

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        p = seq.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and len(seq.output_ids) >= p.min_tokens)

    def _append_token(self, seq: Sequence, raw: torch.Tensor, now: float, token: int | None = None):
        """raw: the row's logits, left as they are (logprobs come from them); token: already
        chosen (a plain greedy row), else sampled here."""
        p = seq.params
        if token is None:
            logits = raw.clone()  # penalties and bans work in place
            apply_penalties(logits, p, seq.prompt_ids, seq.output_ids)
            if len(seq.output_ids) < p.min_tokens:  # nothing may end the sequence yet
                banned = list(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids))
                logits[banned] = float("-inf")
            token = sample_row(logits, p, seq.generator)
        seq.output_ids.append(token)
        self.metrics.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        if seq.logprobs is not None:
            lp, top = top_logprobs(raw, token, p.logprobs)
            seq.logprobs.append({"token_id": token, "logprob": lp, "top": top})
        self._check_stop(seq, token)

    def _check_stop(self, seq: Sequence, token: int):
        p = seq.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            seq.finish_reason, seq.stop_reason = "stop", token
        if self.tokenizer is not None:
            delta = self._detokenize(seq)
            for s in p.stop:
                # a new match must overlap the new text: search only the tail that can hold it
                at = seq.text.find(s, max(0, len(seq.text) - len(delta) - len(s) + 1))
                if at >= 0:
                    seq.text = seq.text[:at]
                    seq.finish_reason, seq.stop_reason = "stop", s
                    break
        if seq.finish_reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"

    def _detokenize(self, seq: Sequence) -> str:
        """Append the newly completed text to seq.text in O(1) decodes per token.

        Decoding a short window (a few tokens of left context, so SentencePiece spaces and
        merges come out right) and diffing against the same window without the new tokens
        avoids re-decoding the whole output. Text is held back while it ends in an incomplete
        UTF-8 character (U+FFFD).
        """
        ids, dec = seq.output_ids, self.tokenizer.decode
        before = dec(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
        after = dec(ids[seq.prefix_offset:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        seq.text += delta
        seq.prefix_offset, seq.read_offset = max(seq.read_offset - 4, 0), len(ids)
        return delta

    def _visible_text(self, seq: Sequence) -> str:
        """Text safe to show now: never half a UTF-8 character, never a possible stop-string prefix."""
        if seq.finished:
            return seq.text
        text = seq.text.rstrip("\ufffd")
        for s in seq.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    text = text[:-k]
                    break
        return text

    def _output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, self._visible_text(s), list(s.output_ids), s.finish_reason,
                                 None if s.logprobs is None else list(s.logprobs), s.stop_reason)
                for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, req.finished,
                             req.seqs[0].cached_tokens)

    # ---- observability --------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "queue_length": len(self.waiting), "running": len(self.running),
            "kv_blocks_used": self.blocks.num_used, "kv_blocks_free": self.blocks.num_free,
            "prefix_hit_rate": self.blocks.hit_rate, "preemptions": self.metrics.preemptions,
            "prompt_tokens": self.metrics.prompt_tokens, "generation_tokens": self.metrics.generation_tokens,
        }
