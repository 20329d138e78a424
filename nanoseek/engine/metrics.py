"""Engine counters and latency histograms (exported by the server as Prometheus text)."""

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple = LATENCY_BUCKETS
    counts: list = None
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, x: float):
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.total += x
        self.n += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound containing the q-quantile (inf past the last bucket)."""
        if not self.n:
            return 0.0
        target, acc = q * self.n, 0
        for bound, c in zip(self.buckets + (float("inf"),), self.counts):
            acc += c
            if acc >= target:
                return bound
        return float("inf")


@dataclass
class EngineMetrics:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)
