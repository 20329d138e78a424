"""The in-process backends for evals: requests go straight into nanoseek's engine.

`EngineGenerator` (GSM8K, HumanEval) streams through `LLM.generate_iter`; `EngineStreamer` (`nanoseek eval
perf`) streams every request through `AsyncLLM`, timing each token as it arrives.
"""

import itertools
import time

import torch

from nanoseek.engine import LLM, AsyncLLM
from nanoseek.errors import NanoseekError
from nanoseek.eval.perf import failed, make_words, memory_split, own_memory, request_timing
from nanoseek.eval.runner import GenRequest
from nanoseek.sampling import SamplingParams


class EngineGenerator:
    # requests in the engine at once, topped up as each finishes (what an HTTP client's
    # concurrency would be): enough to fill a batch, few enough that the KV pool holds them
    MAX_IN_FLIGHT = 64

    def __init__(self, llm: LLM, name: str, max_in_flight: int = MAX_IN_FLIGHT):
        self.llm, self.model, self.max_in_flight = llm, name, max_in_flight

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        outs = [None] * len(requests)
        for i, texts in self.generate_iter(requests):
            outs[i] = texts
        return outs

    def generate_iter(self, requests: list[GenRequest]):
        """(index, texts) as each request finishes; the engine keeps max_in_flight of them going."""
        tok = self.llm.tokenizer
        prompts = [tok.apply_chat_template(r.messages) if r.messages is not None else r.prompt for r in requests]
        params = [SamplingParams(n=r.n, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                 stop=list(r.stop), seed=r.seed) for r in requests]
        for i, out in self.llm.generate_iter(prompts, params, max_in_flight=self.max_in_flight):
            yield i, [c.text for c in out.outputs]


def make_inprocess_generator(model_path, precision: str = "bf16") -> EngineGenerator:
    llm = LLM(model_path, precision=precision)
    return EngineGenerator(llm, str(model_path or "SmolLM2-135M-Instruct"))


# ------------------------------------------------------------------- perf: streaming backend


def weights_bytes(model) -> int:
    """Bytes of the model's parameters and buffers; a tensor tied under two names counts once."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type == "meta":
            continue
        key = (str(t.device), t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def kv_cache_bytes(cache) -> int:
    """Bytes of a PagedKVCache's tensors (keys, values and DSA indexer keys, every layer)."""
    return sum(t.nbytes for t in (*cache.k, *cache.v, *cache.ik) if t is not None)


class EngineStreamer:
    """perf backend over the engine's async streaming path (AsyncLLM), in this process.

    `endpoint="completions"` sends exactly `tokens` prompt tokens; "chat" wraps that text in
    the tokenizer's chat template (so the prompt is a few tokens longer)."""

    kind = "in-process"

    def __init__(self, llm: LLM, name: str, endpoint: str = "completions", max_tokens: int = 32,
                 temperature: float = 0.0, ignore_eos: bool = True, seed: int | None = None):
        self.llm, self.model, self.endpoint = llm, name, endpoint
        if endpoint == "chat" and (llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None)):
            raise NanoseekError(f"--endpoint chat: {name} has no tokenizer with a chat template")
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos,
                                     seed=seed)
        self.where = f"--model {name}"
        self.kv_used_peak_blocks = 0
        self._async = None

    async def __aenter__(self) -> "EngineStreamer":
        self._async = AsyncLLM(self.llm.engine)
        return self

    async def __aexit__(self, *exc) -> None:
        self._async.shutdown()

    def prompt(self, rng, tokens: int) -> list[int]:
        tok, engine = self.llm.tokenizer, self.llm.engine
        if tok is None:  # token ids only: random ones, exactly `tokens` of them
            return [rng.randrange(engine.model.config.vocab_size) for _ in range(tokens)]
        words = tokens + 8
        ids = tok.encode(make_words(rng, words))
        while len(ids) < tokens:  # a tokenizer that merges words: more text, same rng stream
            words *= 2
            ids = tok.encode(make_words(rng, words))
        ids = ids[:tokens]
        if self.endpoint == "chat":
            text = tok.decode(ids, skip_special_tokens=True)
            return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return ids

    async def send(self, prompt_ids: list[int]) -> dict:
        blocks = self.llm.engine.blocks
        t0 = time.perf_counter()
        times, count = [], 0
        try:
            async for out in self._async.generate(prompt_ids, self.params):
                n = len(out.outputs[0].token_ids)
                if n > count:
                    times.append(time.perf_counter() - t0)
                    count = n
                self.kv_used_peak_blocks = max(self.kv_used_peak_blocks, blocks.num_used)
        except Exception as e:  # a bad request fails alone, as over HTTP
            return failed(f"{type(e).__name__}: {e}")
        return request_timing(times, count, len(prompt_ids))

    def memory(self) -> dict:
        engine = self.llm.engine
        kv = kv_cache_bytes(engine.cache)
        slots = engine.blocks.num_blocks * engine.block_size
        memory = own_memory()
        memory.update(weights_bytes=weights_bytes(engine.model), kv_cache_bytes=kv,
                      kv_blocks=engine.blocks.num_blocks, kv_block_size=engine.block_size,
                      kv_bytes_per_token=kv // slots,
                      kv_used_peak_bytes=self.kv_used_peak_blocks * engine.block_size * (kv // slots))
        return memory_split(memory)

    def describe(self) -> dict:
        engine = self.llm.engine
        return {"backend": "in-process", "dtype": str(engine.model.dtype).removeprefix("torch."),
                "torch_threads": torch.get_num_threads(), "max_batch_tokens": engine.max_batch_tokens,
                "max_num_seqs": engine.max_num_seqs}


def make_inprocess_streamer(model_path, precision: str = "bf16", kv_cache_gib: float = 1.0,
                            **streamer_kwargs) -> EngineStreamer:
    llm = LLM(model_path, precision=precision, kv_cache_gib=kv_cache_gib)
    return EngineStreamer(llm, str(model_path or "SmolLM2-135M-Instruct"), **streamer_kwargs)
