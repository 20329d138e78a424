"""GET /metrics: engine state and latency histograms in the Prometheus text format (0.0.4).

Names follow vLLM's with a `nanoseek:` prefix so existing dashboards need only a rename.
The engine thread updates these numbers while we read them; a scrape may be a step stale,
which Prometheus tolerates, and no lock is taken on the hot path.
"""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**kv) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in kv.items())
    return "{" + inner + "}" if inner else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


def _family(lines: list, name: str, kind: str, help: str):
    lines.append(f"# HELP nanoseek:{name} {help}")
    lines.append(f"# TYPE nanoseek:{name} {kind}")


def _histogram(lines: list, name: str, help: str, hist, labels: dict):
    _family(lines, name, "histogram", help)
    counts = list(hist.counts)  # snapshot: the engine thread may observe meanwhile
    acc = 0
    for bound, c in zip(hist.buckets, counts):
        acc += c
        lines.append(f"nanoseek:{name}_bucket{_labels(**labels, le=_num(float(bound)))} {acc}")
    acc += counts[-1]
    lines.append(f"nanoseek:{name}_bucket{_labels(**labels, le='+Inf')} {acc}")
    lines.append(f"nanoseek:{name}_sum{_labels(**labels)} {_num(float(hist.total))}")
    lines.append(f"nanoseek:{name}_count{_labels(**labels)} {acc}")


def render(engine, model_name: str, finished: dict[str, int]) -> str:
    """engine: the Engine (stats() + metrics); finished: finish reason -> finished requests."""
    s, m = engine.stats(), engine.metrics
    total_blocks = s["kv_blocks_used"] + s["kv_blocks_free"]
    lab = {"model_name": model_name}
    lines = []
    gauges = [
        ("num_requests_running", "Sequences in the running batch.", s["running"]),
        ("num_requests_waiting", "Sequences waiting to be scheduled.", s["queue_length"]),
        ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
         s["kv_blocks_used"] / total_blocks if total_blocks else 0.0),
        ("kv_cache_blocks_used", "KV-cache blocks held by sequences.", s["kv_blocks_used"]),
        ("kv_cache_blocks_free", "KV-cache blocks free or holding evictable cached prefixes.", s["kv_blocks_free"]),
        ("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.", float(s["prefix_hit_rate"])),
    ]
    for name, help, value in gauges:
        _family(lines, name, "gauge", help)
        lines.append(f"nanoseek:{name}{_labels(**lab)} {_num(value)}")
    counters = [
        ("num_preemptions_total", "Sequences preempted for lack of KV-cache space.", s["preemptions"]),
        ("prompt_tokens_total", "Prompt tokens computed (prefix-cache hits excluded).", s["prompt_tokens"]),
        ("generation_tokens_total", "Tokens generated.", s["generation_tokens"]),
    ]
    for name, help, value in counters:
        _family(lines, name, "counter", help)
        lines.append(f"nanoseek:{name}{_labels(**lab)} {_num(value)}")
    _family(lines, "request_success_total", "counter",
            "Engine requests that finished, by the finish reason of their first sample.")
    for reason in sorted(set(finished) | {"stop", "length"}):
        lines.append(f"nanoseek:request_success_total{_labels(**lab, finished_reason=reason)} {finished.get(reason, 0)}")
    _histogram(lines, "time_to_first_token_seconds", "Time from arrival to the first token.", m.ttft, lab)
    _histogram(lines, "inter_token_latency_seconds", "Time between consecutive tokens of a sequence.", m.itl, lab)
    _histogram(lines, "e2e_request_latency_seconds", "Time from arrival to the last token of a request.", m.e2e, lab)
    return "\n".join(lines) + "\n"
