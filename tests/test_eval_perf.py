"""`nanoseek eval perf`: an in-process run on a tiny GGUF model, the endpoint path against a real
`nanoseek serve` process of a tiny model, the memory split, compare, and one-line flag errors."""

import json

import pytest
from torch import nn

from nanoseek.cli import build_parser, main
from nanoseek.eval import perf, runner
from nanoseek.eval.inprocess import weights_bytes
from nanoseek.model.transformer import Transformer
from tests.fixtures import TINY, write_tiny_gguf
from tests.test_serve_helpers import ServerProcess, free_port, tiny_config

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def run_cli(argv):
    args = build_parser().parse_args(["eval", "perf", *argv, "--no-progress"])
    assert args.func(args) == 0
    return args


def read_outputs(out):
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return results, records, (out / "summary.md").read_text()


def check_runs(results, levels, n, max_tokens):
    runs = results["scores"]["runs"]
    assert [run["concurrency"] for run in runs] == levels  # batch 1 is always measured first
    for run in runs:
        assert run["completed"] == n and run["failed"] == 0, run["errors"]
        assert run["total_output_tokens"] == n * max_tokens  # ignore_eos: exactly max_tokens each
        assert run["request_throughput"] > 0 and run["output_token_throughput"] > run["request_throughput"]
        for key in METRICS:
            stats = run[key]
            assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], (key, stats)
        assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]


def check_targets(results, memory_measured):
    rows = results["scores"]["targets"]
    assert [row["target"] for row in rows] == ["TTFT p50 < 200 ms", "TTFT p99 < 200 ms", "peak memory < 12 GB"]
    batch1 = results["scores"]["runs"][0]
    assert [rows[0]["measured"], rows[1]["measured"]] == [batch1["ttft_ms"]["p50"], batch1["ttft_ms"]["p99"]]
    for row in rows[:2]:
        assert row["passed"] == (row["measured"] < 200)
    if memory_measured:
        assert rows[2]["measured"] == results["scores"]["memory"]["rss_peak_bytes"]
        assert rows[2]["passed"] == (rows[2]["measured"] < 12e9)
    else:
        assert rows[2]["measured"] is None and rows[2]["passed"] is None


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("perf") / "tiny.gguf"
    write_tiny_gguf(str(path))
    return path


# ------------------------------------------------------------------------------ in-process


def test_inprocess_run_writes_results_summary_and_memory_split(tiny_gguf, tmp_path, capsys):
    import nanoseek
    out = tmp_path / "perf"
    run_cli(["--model", str(tiny_gguf), "--precision", "fp32", "--kv-cache-gib", "0.002",
             "--concurrency", "3", "--num-requests", "4", "--prompt-tokens", "6", "--max-tokens", "5",
             "--out", str(out)])
    results, records, summary = read_outputs(out)

    assert results["task"] == "perf" and results["model"] == str(tiny_gguf)
    config = results["config"]
    assert {k: config[k] for k in ("backend", "precision", "dtype", "prompt_tokens", "max_tokens",
                                   "num_requests", "concurrency", "endpoint", "ignore_eos")} == {
        "backend": "in-process", "precision": "fp32", "dtype": "float32", "prompt_tokens": 6, "max_tokens": 5,
        "num_requests": 4, "concurrency": [1, 3], "endpoint": "completions", "ignore_eos": True}
    assert results["data"]["num_problems"] == 8 and results["wall_time_s"] > 0
    check_runs(results, [1, 3], n=4, max_tokens=5)
    for run in results["scores"]["runs"]:
        assert run["total_prompt_tokens"] == 4 * 6  # in-process prompts are exactly --prompt-tokens long

    memory = results["scores"]["memory"]
    model, _ = nanoseek.load(str(tiny_gguf), "fp32")
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    assert memory["weights_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # 2 layers x (k + v) x 2 KV heads x head_dim 16 x fp32, per token, over every slot of the pool
    per_token = TINY["layers"] * 2 * TINY["kv_heads"] * (TINY["hidden"] // TINY["heads"]) * 4
    assert memory["kv_bytes_per_token"] == per_token
    assert memory["kv_cache_bytes"] == memory["kv_blocks"] * memory["kv_block_size"] * per_token > 0
    assert 0 < memory["kv_used_peak_bytes"] <= memory["kv_cache_bytes"]
    assert memory["rss_peak_bytes"] >= memory["rss_bytes"] > memory["weights_bytes"] + memory["kv_cache_bytes"]
    assert memory["other_bytes"] == memory["rss_peak_bytes"] - memory["weights_bytes"] - memory["kv_cache_bytes"]
    check_targets(results, memory_measured=True)

    assert len(records) == 8 and all(r["ok"] and r["output_tokens"] == 5 for r in records)
    assert [r["concurrency"] for r in records] == [1] * 4 + [3] * 4
    for text in ("| concurrency | ok / failed | TTFT p50 / p90 / p99 (ms)", "| 1 | 4 / 0 |", "| 3 | 4 / 0 |",
                 "| weights (parameters + buffers) |", "| KV cache (paged pool) |",
                 "| TTFT p99 < 200 ms (batch 1, 6-token prompts) |", "| peak memory < 12 GB (peak RSS) |"):
        assert text in summary, text
    assert capsys.readouterr().out == summary  # the table is printed too

    # compare reads perf results: latencies and memory as they are, not as percentages
    table = runner.compare([str(out / "results.json"), str(out / "results.json")]).splitlines()
    assert table[0] == f"| metric | {tiny_gguf} (perf) [perf] | {tiny_gguf} (perf) [perf] |"
    ttft = results["scores"]["runs"][0]["ttft_ms"]["p50"]
    assert f"| c=1 TTFT p50 (ms) | {ttft:.1f} | {ttft:.1f} |" in table
    assert f"| weights | {perf.fmt_bytes(memory['weights_bytes'])} | {perf.fmt_bytes(memory['weights_bytes'])} |" \
        in table
    assert "| problems | 8 | 8 |" in table


def test_weights_bytes_counts_a_tied_tensor_once():
    model = Transformer(tiny_config()).init_weights(seed=0)
    untied = weights_bytes(model)
    assert untied == sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    # lm_head now shares the embedding's storage through a second Parameter object
    model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.data)
    assert weights_bytes(model) == untied - model.lm_head.weight.numel() * model.lm_head.weight.element_size()


# ------------------------------------------------------------------------- OpenAI endpoint


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory):
    """The real `nanoseek serve` CLI in a child process, serving a tiny random model as "tiny"."""
    server = ServerProcess(tmp_path_factory.mktemp("serve"), ["--served-model-name", "tiny", "--kv-cache-gib", "0.02"])
    try:
        server.health_history(timeout=120)
        yield server.url, server.proc.pid
    finally:
        server.stop()


def test_endpoint_run_against_nanoseek_serve(serve_process, tmp_path):
    url, pid = serve_process
    out = tmp_path / "completions"
    run_cli(["--base-url", url + "/v1", "--server-pid", str(pid), "--concurrency", "1,2",
             "--num-requests", "4", "--prompt-tokens", "4", "--max-tokens", "6", "--out", str(out)])
    results, records, summary = read_outputs(out)
    assert results["model"] == "tiny"  # from GET /v1/models
    assert results["config"]["backend"] == "openai" and results["config"]["base_url"] == url + "/v1"
    assert results["config"]["server_pid"] == pid
    check_runs(results, [1, 2], n=4, max_tokens=6)
    memory = results["scores"]["memory"]
    assert memory["rss_peak_bytes"] >= memory["rss_bytes"] > 0  # the server's, from /proc/PID/status
    assert memory["weights_bytes"] is None and memory["kv_cache_bytes"] is None  # not visible over HTTP
    check_targets(results, memory_measured=True)
    assert len(records) == 8 and all(r["ok"] and r["prompt_tokens"] > 0 for r in records)
    assert f"server process {pid}" in summary


def test_endpoint_chat_without_server_pid_reports_memory_not_measured(serve_process, tmp_path):
    url, _ = serve_process
    out = tmp_path / "chat"
    run_cli(["--base-url", url, "--model", "tiny", "--endpoint", "chat", "--concurrency", "2",
             "--num-requests", "2", "--prompt-tokens", "3", "--max-tokens", "4", "--warmup", "0",
             "--out", str(out)])
    results, _, summary = read_outputs(out)
    check_runs(results, [1, 2], n=2, max_tokens=4)
    assert results["scores"]["memory"]["rss_peak_bytes"] is None
    check_targets(results, memory_measured=False)
    assert "| peak memory < 12 GB (peak RSS) | not measured | not measured |" in summary


# ------------------------------------------------------------------------------ bad input


def error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "perf", *argv, "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def test_bad_flags_give_one_line_errors(capsys, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cases = [
        (["--concurrency", "0"], "error: --concurrency must be >= 1, got 0"),
        (["--concurrency", "1,x"], "error: --concurrency must be comma-separated integers, got '1,x'"),
        (["--num-requests", "0"], "error: --num-requests must be >= 1, got 0"),
        (["--prompt-tokens", "0"], "error: --prompt-tokens must be >= 1, got 0"),
        (["--max-tokens", "-1"], "error: --max-tokens must be >= 1, got -1"),
        (["--server-pid", "1"], "error: --server-pid needs --base-url"),
        (["--base-url", "localhost:8000"], "error: --base-url must start with http:// or https://"),
        (["--base-url", dead, "--server-pid", "999999999"], "error: --server-pid 999999999: cannot read"),
        (["--base-url", dead], f"error: --base-url {dead}/v1: cannot reach {dead}/v1/models (ConnectError"),
        (["--base-url", dead, "--model", "m"], f"error: --base-url {dead}/v1: warm-up request failed: ConnectError"),
        (["--base-url", dead, "--model", "m", "--warmup", "0"],
         f"error: --base-url {dead}/v1: all 16 requests failed at concurrency 1: ConnectError"),
    ]
    for argv, start in cases:
        assert error_line(argv + ["--out", str(tmp_path / "x")], capsys).startswith(start), argv
    assert not (tmp_path / "x").exists()  # nothing written for a failed run
