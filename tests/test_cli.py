"""The CLI's contract: one `error:` line naming the file or field, exit status 1, no traceback."""

import json
import subprocess
import sys

import pytest

from tests.tiny_models import make_llama


def run(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def assert_clean_error(res, *needles):
    assert res.returncode == 1, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_llama(path)
    return path


def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_safetensors(ckpt, tmp_path):
    d = copy_ckpt(ckpt, tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert_clean_error(run("generate", "hi", "--model", str(d)), str(d), "safetensors")


def test_truncated_safetensors(ckpt, tmp_path):
    d = copy_ckpt(ckpt, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(run("generate", "hi", "--model", str(d)), "model.safetensors")


def test_unknown_architecture(ckpt, tmp_path):
    d = copy_ckpt(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("generate", "hi", "--model", str(d)), "config.json", "architectures", "MambaForCausalLM")


def test_config_weights_shape_mismatch(ckpt, tmp_path):
    d = copy_ckpt(ckpt, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("generate", "hi", "--model", str(d)), "model.safetensors", "mlp", "shape", "config.json")


def test_gguf_of_unsupported_type(tmp_path):
    import gguf
    import numpy as np
    from tests.fixtures import write_tiny_gguf
    path = str(tmp_path / "bad.gguf")
    # Q5_0: a real llama.cpp type that nanoseek does not dequantise (blocks of 32 -> 22 bytes)
    t = gguf.GGMLQuantizationType.Q5_0
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = np.zeros((64, 64 // block * size), dtype=np.uint8)
    write_tiny_gguf(path, raw={"blk.0.attn_q.weight": (raw, t)})
    assert_clean_error(run("generate", "hi", "--model", path), "bad.gguf", "blk.0.attn_q.weight", "Q5_0")


def test_empty_prompt():
    assert_clean_error(run("generate", "   "), "empty prompt")


def test_missing_model_path(tmp_path):
    assert_clean_error(run("generate", "hi", "--model", str(tmp_path / "nope")), "nope")


@pytest.mark.slow
def test_generate_and_chat_answer_sensibly_on_smollm2():
    res = run("generate", "--chat", "What is the capital of France?", "--temperature", "0", "--max-tokens", "20")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    res = run("chat", "--temperature", "0", "--max-tokens", "40",
              stdin="What is the capital of France?\nAnd of Italy?\n")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout and "Rome" in res.stdout
