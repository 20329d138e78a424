"""Quantized precisions on the command line: `nanoseek serve`, `nanoseek eval`, generate/chat.

The choices are one list (nanoseek.loading.LOAD_PRECISIONS); serve answers a chat completion
from a tiny GGUF quantized to int8 on load, and an in-process eval runs on it at int8.
"""

import json
import sys

import httpx
import pytest
import torch

from nanoseek.checkpoint.hf import PRECISIONS
from nanoseek.cli import build_parser
from nanoseek.loading import LOAD_PRECISIONS
from nanoseek.quant import SCHEMES, QuantizedTransformer
from nanoseek.quant.layers import Int8Linear
from tests.fixtures import write_tiny_gguf
from tests.test_serve_helpers import LiveServer, wait_until

# every subcommand that loads a model in-process, with the arguments it needs besides --precision
LOADERS = {
    "serve": ["serve"],
    "eval gsm8k": ["eval", "gsm8k", "--model", "m"],
    "eval humaneval": ["eval", "humaneval", "--model", "m"],
    "generate": ["generate", "hi"],
    "chat": ["chat"],
}


from tests.fixtures import one_thread  # noqa: E402,F401  (autouse: this module runs on one thread)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_gguf(str(path))  # a byte-level BPE vocab and a ChatML template
    return path


def test_one_list_of_precisions():
    assert LOAD_PRECISIONS == (*PRECISIONS, *SCHEMES) == ("fp32", "bf16", "int8", "int8-dynamic", "int4", "fp8")


@pytest.mark.parametrize("command", LOADERS)
def test_every_loader_defaults_to_what_this_cpu_computes_best(command, monkeypatch):
    """--precision's default is bf16 only where bf16 matmuls run at speed (nanoseek/hardware.py);
    'auto' is also a choice, resolved by load()."""
    from nanoseek import hardware
    for fast, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "_cpu_bf16", lambda fast=fast: fast)
        assert build_parser().parse_args(LOADERS[command]).precision == want
    assert build_parser().parse_args([*LOADERS[command], "--precision", "auto"]).precision == "auto"


def test_load_resolves_auto_and_warns_once_about_slow_bf16(tiny_gguf, monkeypatch, capsys):
    from nanoseek import hardware
    from nanoseek.loading import load
    monkeypatch.setattr(hardware, "_warned", set())
    monkeypatch.setattr(hardware, "_cpu_bf16", lambda: False)
    assert load(tiny_gguf, "auto")[0].dtype == torch.float32
    assert capsys.readouterr().err == ""  # fp32 by choice: nothing to say
    for _ in range(2):
        assert load(tiny_gguf, "bf16")[0].dtype == torch.bfloat16  # asked for explicitly: kept
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "precision bf16" in err[0] and "no bf16 matmul units" in err[0] and "fp32" in err[0]
    monkeypatch.setattr(hardware, "_cpu_bf16", lambda: True)
    assert load(tiny_gguf, "auto")[0].dtype == torch.bfloat16


@pytest.mark.parametrize("command", LOADERS)
def test_every_loader_takes_the_quantized_precisions(command, capsys):
    parser = build_parser()
    for precision in LOAD_PRECISIONS:
        assert parser.parse_args([*LOADERS[command], "--precision", precision]).precision == precision
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*LOADERS[command], "--precision", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --precision: invalid choice: 'int3'" in err and "int4" in err


def test_serve_at_int8_answers_a_chat_completion(tiny_gguf):
    from nanoseek.serve.server import build_app
    args = build_parser().parse_args(["serve", "--model_path", str(tiny_gguf), "--precision", "int8",
                                      "--kv_cache_gib", "0.01", "--served_model_name", "tiny"])
    app = build_app(args)
    with LiveServer(app) as url:
        assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=60), \
            httpx.get(url + "/health").json()
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                             "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and isinstance(body["choices"][0]["message"]["content"], str)
        assert 1 <= body["usage"]["completion_tokens"] <= 6
        model = app.state.serve.llm.engine.model
    assert isinstance(model, QuantizedTransformer) and model.quant_scheme == "int8"
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)


def test_eval_gsm8k_in_process_at_int8(tiny_gguf, tmp_path, monkeypatch, capsys):
    import nanoseek.eval.inprocess as inprocess
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"{a} + 1 = {a + 1}\n#### {a + 1}"})
                            + "\n" for a in (2, 5)))
    made = []
    original = inprocess.make_inprocess_generator

    def spy(model_path, precision="bf16"):
        made.append(original(model_path, precision))
        return made[-1]

    monkeypatch.setattr(inprocess, "make_inprocess_generator", spy)
    out = tmp_path / "out"
    args = build_parser().parse_args(["eval", "gsm8k", "--model", str(tiny_gguf), "--precision", "int8",
                                      "--data", str(data), "--num-fewshot", "0", "--max-tokens", "4",
                                      "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    (generator,) = made
    assert isinstance(generator.llm.model, QuantizedTransformer) and generator.llm.model.quant_scheme == "int8"
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["num_problems"] == 2 and 0.0 <= results["scores"]["strict-match"]["exact_match"] <= 1.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(isinstance(s["output"], str) for s in samples)
    assert "gsm8k" in capsys.readouterr().out
