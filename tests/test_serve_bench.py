"""bench/serve_load.py against a live server: both load modes, the JSON report and the plot,
and --start-server with a custom server command."""

import json
import sys
from pathlib import Path

import pytest

from nanoseek.engine import Engine
from nanoseek.serve import create_app
from tests.fixtures import load_bench
from tests.test_serve_helpers import LAUNCHER, ROOT, CharTokenizer, LiveServer, tiny_model



@pytest.fixture(scope="module")
def bench():
    return load_bench("serve_load")


def check_run(run, n):
    assert run["completed"] == n and run["failed"] == 0, run["errors"]
    assert run["total_output_tokens"] == n * 8  # ignore_eos: every request makes exactly max_tokens
    assert run["request_throughput"] > 0 and run["output_token_throughput"] > run["request_throughput"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = run[key]
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (key, s)
    assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]


def test_poisson_and_fixed_concurrency_report(bench, tmp_path, capsys):
    engine = Engine(tiny_model(seed=0, max_seq_len=256), CharTokenizer(), num_blocks=128)
    with LiveServer(create_app(engine, "tiny")) as url:
        out, png = tmp_path / "r.json", tmp_path / "r.png"
        report = bench.main(["--base-url", url + "/v1", "--num-requests", "10", "--request-rate", "40,inf",
                             "--concurrency", "3", "--input-len", "8", "--output-len", "8", "--ignore-eos",
                             "--out", str(out), "--plot", str(png)])
    assert report["config"]["model"] == "tiny"  # found through GET /v1/models
    assert [r["request_rate"] for r in report["runs"]] == [40.0, "inf"]
    assert all(r["concurrency"] == 3 for r in report["runs"])
    for run in report["runs"]:
        check_run(run, 10)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out)["runs"][0]["completed"] == 10


def test_completions_endpoint_with_started_server(bench, tmp_path, monkeypatch):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    monkeypatch.setenv("SERVE_TEST_ROOT", str(ROOT))
    report = bench.main(["--start-server", "--served-model-name tiny --kv-cache-gib 0.02",
                         "--server-cmd", f"{sys.executable} {launcher}", "--server-timeout", "120",
                         "--endpoint", "completions", "--num-requests", "6", "--concurrency", "2",
                         "--input-len", "4", "--output-len", "8", "--ignore-eos", "--warmup", "0"])
    assert report["config"]["model"] == "tiny"
    check_run(report["runs"][0], 6)
