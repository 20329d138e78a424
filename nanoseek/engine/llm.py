"""The in-process API, in the shape vLLM users know: LLM(...).generate / .chat, and an
async streaming front (AsyncLLM) that the HTTP server drives."""

import asyncio
import threading
import uuid

from tqdm import tqdm

from nanoseek.engine.engine import Engine
from nanoseek.engine.outputs import RequestOutput
from nanoseek.errors import NanoseekError
from nanoseek.sampling import SamplingParams


def _engine_kwargs(kw):
    keys = ("max_batch_tokens", "max_num_seqs", "kv_cache_gib", "num_blocks", "block_size", "enable_prefix_caching",
            "watermark")
    return {k: kw[k] for k in keys if k in kw}


class LLM:
    """llm = LLM(path, precision="bf16", max_batch_tokens=4096, kv_cache_gib=1.0); precision="auto" takes
    bf16 where the CPU runs it at speed, else fp32 (nanoseek/hardware.py)."""

    def __init__(self, model=None, precision: str = "fp32", tokenizer=None, **engine_kwargs):
        if model is None or isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from nanoseek.loading import load
            model, tokenizer = load(model, precision)
        self.model, self.tokenizer = model, tokenizer
        unknown = set(engine_kwargs) - set(_engine_kwargs(engine_kwargs))
        if unknown:
            raise NanoseekError(f"LLM: unknown argument(s) {', '.join(sorted(unknown))}")
        self.engine = Engine(model, tokenizer, **engine_kwargs)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a token-id list, or a list of either. Outputs keep input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        done = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            for i, out in self.generate_iter(prompts, params):
                done[i] = out
                bar.update(1)
        return done

    def generate_iter(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                      max_in_flight: int | None = None):
        """Yield (index into prompts, RequestOutput) as each request finishes. At most
        `max_in_flight` requests are in the engine at once (None: all), topped up as each one
        finishes, so the batch never waits for its slowest member and a long list of
        long generations does not overrun the KV pool into preemption churn."""
        if self.engine.driver is not None:
            raise NanoseekError("LLM.generate: this engine is being served by an AsyncLLM; send requests "
                                "through it, or shut it down first")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        limit = len(prompts) if max_in_flight is None else max(1, max_in_flight)
        index, pending = {}, list(zip(range(len(prompts)), prompts, plist))[::-1]
        try:
            while pending or self.engine.has_unfinished():
                while pending and len(index) < limit:
                    i, p, sp = pending.pop()
                    index[self.engine.add_request(p, sp)] = i
                for out in self.engine.step():
                    if out.finished:
                        yield index.pop(out.request_id), out
        finally:
            for rid in list(index):  # an exception, Ctrl-C or an abandoned iterator must not leave blocks held
                self.engine.abort(rid)

    def reset_prefix_cache(self) -> bool:
        """After changing the model's weights: see Engine.reset_prefix_cache."""
        return self.engine.reset_prefix_cache()

    def chat(self, messages, params: SamplingParams | None = None, **template_kwargs) -> list[RequestOutput]:
        """messages: one conversation (list of {role, content}) or a list of them."""
        if self.tokenizer is None:
            raise NanoseekError("chat needs a tokenizer with a chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **template_kwargs) for c in convs]
        return self.generate(prompts, params)


class AsyncLLM:
    """Runs the engine loop on a background thread; coroutines stream each request's outputs.

    add/abort calls are queued and applied between steps, so the engine is only ever touched
    by its own thread.
    """

    def __init__(self, engine: Engine):
        if engine.driver is not None:
            raise NanoseekError("AsyncLLM: this engine is already driven by another AsyncLLM; share that one "
                                "(create_app accepts it), or shut it down first")
        engine.driver = self
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox = []          # ("add", args) / ("abort", rid)
        self._streams = {}        # rid -> (loop, asyncio.Queue)
        self._aborted = set()     # aborts that arrived before their request was added
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def _loop(self):
        try:
            self._serve()
        finally:  # released by the thread itself, so a new driver never overlaps a last step
            self.engine.driver = None

    def _serve(self):
        while not self._stop:
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for kind, arg in inbox:
                if kind == "add":
                    rid, prompt, params = arg
                    if rid in self._aborted:
                        self._aborted.discard(rid)
                        self._deliver(rid, RuntimeError(f"request {rid} was aborted"))
                        continue
                    try:
                        self.engine.add_request(prompt, params, rid)
                    except Exception as e:  # bad request: report to its stream, keep serving
                        self._deliver(rid, e)
                else:
                    out = self.engine.abort(arg)
                    if out is not None:
                        self._deliver(arg, out)
                    else:  # its add may still be on the way: drop it when it comes (bounded memory)
                        self._aborted.add(arg)
                        if len(self._aborted) > 4096:
                            self._aborted.pop()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, frees their blocks, and serving goes on
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, e)
                continue
            for out in outs:
                self._deliver(out.request_id, out)

    def _deliver(self, rid, item):
        with self._lock:
            entry = self._streams.get(rid)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, item)

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None):
        """Async iterator of RequestOutput snapshots; cancelling it aborts the request."""
        rid = request_id or uuid.uuid4().hex
        q = asyncio.Queue()
        with self._lock:
            self._streams[rid] = (asyncio.get_running_loop(), q)
            self._inbox.append(("add", (rid, prompt, params)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # client went away or error: free the request's blocks
                self.abort(rid)
            with self._lock:
                self._streams.pop(rid, None)

    def abort(self, request_id: str):
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def shutdown(self):
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
