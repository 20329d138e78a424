"""What the server knows between requests: the loaded model, admission and in-flight requests.

Everything here is touched only from the event loop, except `llm`/`load_error`, which the
loader thread sets once.
"""

import asyncio
import contextlib
import time
from collections import Counter

from nanoseek.serve.protocol import APIError


class ServerState:
    def __init__(self, model_name: str, api_key: str | None, max_queued_requests: int):
        self.model_name, self.api_key = model_name, api_key
        self.max_queued_requests = max_queued_requests
        self.llm = None               # AsyncLLM once loaded
        self.owns_llm = False         # shut its engine thread down with the app
        self.load_error: str | None = None
        self.created = int(time.time())
        self.waiting = 0              # admitted engine requests that have no output yet
        self.inflight = {}            # engine request id -> AsyncLLM
        self.draining = False
        self.finished = Counter()     # finish reason -> engine requests (for /metrics)

    # ---- readiness and admission ------------------------------------------------------------
    def require_llm(self):
        if self.llm is None:
            if self.load_error:
                raise APIError(503, f"model failed to load: {self.load_error}", "server_error", code="model_load_failed")
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="model_loading")
        return self.llm

    def admit(self, count: int):
        """Refuse at once instead of queueing without bound: a 503 tells a load balancer to go elsewhere."""
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.waiting + count > self.max_queued_requests:
            raise APIError(503, f"too many queued requests ({self.waiting} waiting, limit "
                                f"{self.max_queued_requests}); retry later", "server_error", code="queue_full")

    # ---- generation -------------------------------------------------------------------------
    def generate(self, llm, prompt_ids: list[int], params, rid: str) -> "Tracked":
        return Tracked(self, llm, prompt_ids, params, rid)

    def abort_all(self):
        for rid, llm in list(self.inflight.items()):
            llm.abort(rid)


class Tracked:
    """One engine request as an async iterator, counted from admission until it is closed.

    It counts as waiting until its first output (that is what --max-queued-requests bounds)
    and as in flight until closed. Closing it closes the engine's iterator, which aborts an
    unfinished request and frees its KV blocks at once instead of whenever the garbage
    collector gets to it. Closing is idempotent and safe before the first iteration.
    """

    def __init__(self, state: ServerState, llm, prompt_ids: list[int], params, rid: str):
        self.state, self.rid = state, rid
        self._outs = llm.generate(prompt_ids, params, rid)
        self._waiting, self._closed = True, False
        state.waiting += 1
        state.inflight[rid] = llm

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._closed:
            raise StopAsyncIteration
        try:
            out = await self._outs.__anext__()
        except BaseException:  # finished, failed or cancelled: the request is over either way
            await self.aclose()
            raise
        self._first_output()
        if out.finished and out.outputs[0].finish_reason != "abort":
            self.state.finished[out.outputs[0].finish_reason] += 1
        return out

    def _first_output(self):
        if self._waiting:
            self._waiting = False
            self.state.waiting -= 1

    async def aclose(self):
        if self._closed:
            return
        self._closed = True
        self._first_output()
        self.state.inflight.pop(self.rid, None)
        await self._outs.aclose()


_DONE = object()


async def merge(gens: list):
    """Interleave several async iterators -> (index, item), as items arrive.

    Closing the merged iterator cancels every pump, which closes every source.
    """
    q = asyncio.Queue()

    async def pump(i, gen):
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    q.put_nowait((i, item))
            q.put_nowait((i, _DONE))
        except Exception as e:  # handed to the consumer, which raises it
            q.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
