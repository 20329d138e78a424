"""torchrun with 2 CPU processes (gloo) equals one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.train.config import dump_toml, load_config
from nanoseek.train.speedrun import KNOBS, QUICK, build_data
from tests.test_train_loop import losses, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("dist_data"), {**KNOBS, **QUICK})


def torchrun(cfg_file: Path, nproc: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "nanoseek.train", "--config", str(cfg_file)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def write_cfg(tmp_path, name, overrides):
    f = tmp_path / f"{name}.toml"
    f.write_text(dump_toml(load_config(None, overrides).to_dict()))
    return f


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_match_one(data, tmp_path, kind):
    from nanoseek.train.trainer import train
    steps = 4
    # one process: 4 rows per micro-batch; two processes: 2 rows each (the same 4 rows).
    # fp32: bf16 rounding differs with the batch shape, and Muon's Newton-Schulz amplifies it
    one = tmp_path / "one"
    train(load_config(None, tiny_overrides(data, one, steps, "data.batch_size=4", "run.bf16=false")), resume=False)
    two = tmp_path / "two"
    torchrun(write_cfg(tmp_path, "two", tiny_overrides(data, two, steps, "data.batch_size=2", f'run.dist="{kind}"',
                                                      "run.save_every=2", "run.bf16=false")), 2)
    a, b = losses(one), losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-3, abs=1e-3)
    assert a[-1][1] < a[0][1]  # and the run learns
    # Muon and Adam are blind to the gradient's scale: check it directly (a wrong 1/world shows here)
    norms = [[r["grad_norm"] for r in map(json.loads, open(d / "log.jsonl")) if "loss" in r] for d in (one, two)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)
    rec = [json.loads(line) for line in open(two / "log.jsonl")][0]
    assert rec["event"] == "config" and rec["world_size"] == 2
    assert (two / "model" / "model.safetensors").is_file()
