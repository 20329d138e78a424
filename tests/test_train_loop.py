"""The training loop: config files and overrides, schedule, Muon, MoE balancing, exact resume."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.errors import NanoseekError
from nanoseek.train.config import dump_toml, load_config
from nanoseek.train.speedrun import KNOBS, QUICK, build_data

TINY = QUICK["model_overrides"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_data")
    return build_data(out, {**KNOBS, **QUICK})


def tiny_overrides(data, out, steps=8, *extra):
    d = Path(data["dir"])
    return [f"run.out_dir={json.dumps(str(out))}", f"data.shards={json.dumps(str(d / 'shards'))}",
            f"data.eval_shards={json.dumps(str(d / 'eval_shards'))}",
            "data.seq_len=64", "data.batch_size=2", "data.grad_accum=2", f"schedule.steps={steps}",
            "schedule.warmup_steps=2", "run.threads=1", "run.progress=false", "run.plot=false", "eval.every=0",
            "eval.batches=1", "moe.seq_aux_loss=0.001", "moe.bias_update_speed=0.01",
            "model.overrides=" + json.dumps(TINY).replace(":", "=").replace('"', ""), *extra]


def final_state(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)["model"]


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in r]


# ---- config ------------------------------------------------------------------------------

def test_config_file_overrides_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 0.01\n[data]\nshards = "x"\n[model.overrides]\nn_layers = 2\n')
    cfg = load_config(toml, ["optim.lr=2e-3", "schedule.steps=7", "lora.targets=q_proj", "model.overrides.dim=32"])
    assert cfg.optim.lr == 2e-3 and cfg.schedule.steps == 7 and cfg.data.shards == "x"
    assert cfg.model.overrides == {"n_layers": 2, "dim": 32} and cfg.lora.targets == "q_proj"
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data:\n  shards: y\n  seq_len: 32\nschedule:\n  decay: cosine\n")
    cfg = load_config(yaml)
    assert cfg.data.seq_len == 32 and cfg.schedule.decay == "cosine"
    # the resolved config round-trips through TOML
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(cfg.to_dict()))
    assert load_config(again).to_dict() == cfg.to_dict()
    for bad, match in ((["optim.lrr=1"], "optim.lrr"), (["optim.lr=abc"], "optim.lr"), (["nosection.x=1"], "nosection"),
                       (["data.mode=rl"], "data.mode"), (["schedule.steps=1.5"], "schedule.steps")):
        with pytest.raises(NanoseekError, match=match):
            load_config(toml, bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nlr=1")
    with pytest.raises(NanoseekError, match="broken.toml"):
        load_config(broken)


def test_schedule_warmup_flat_decay():
    from nanoseek.train.optim import lr_multiplier
    cfg = load_config(None, ['data.shards="x"', "schedule.steps=100", "schedule.warmup_steps=10", "schedule.decay_frac=0.5"])
    m = [lr_multiplier(s, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[30] == 1.0 and m[49] == 1.0
    assert m[50] < 1.0 and m[75] == pytest.approx(0.5, abs=0.03) and m[99] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # never goes back up after warmup


def test_newton_schulz_orthogonalises():
    from nanoseek.train.optim import newton_schulz
    g = torch.randn(3, 64, 32)
    o = newton_schulz(g).float()
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5  # all singular values pushed to ~1
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 2


def test_sequence_aux_loss_prefers_balanced_routing():
    from nanoseek.train.balance import sequence_aux_loss
    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer
    cfg = ModelConfig.preset("moe-16x2").to_dict()
    cfg.update(TINY, vocab_size=64)
    model = Transformer(ModelConfig.from_dict(cfg)).init_weights(seed=0)
    gate = model.layers[1].mlp.gate
    gate.keep_scores = True
    model(torch.randint(0, 64, (2, 16)))
    base = sequence_aux_loss(model, 2, 16, 1.0)
    assert base.requires_grad
    assert sequence_aux_loss(model, 2, 16, 1.0, torch.ones(2, 16, dtype=torch.bool)).item() == pytest.approx(base.item())
    half = torch.arange(16).expand(2, 16) < 8  # "padding" after 8 tokens changes what is balanced
    assert sequence_aux_loss(model, 2, 16, 1.0, half).item() != pytest.approx(base.item())
    base.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    # all tokens on one expert with all the score mass -> loss = E/K * 1 = 2 per sequence
    E = gate.weight.shape[0]
    gate.last_scores = torch.zeros(32, E).index_fill_(1, torch.tensor([0]), 1.0)
    gate.last_idx = torch.tensor([[0, 1]] * 32)
    assert sequence_aux_loss(model, 2, 16, 1.0).item() == pytest.approx(E / 2)
    assert base.item() < E / 2


def test_bias_update_moves_towards_balance(data, tmp_path):
    from nanoseek.train.trainer import Trainer
    cfg = load_config(None, tiny_overrides(data, tmp_path / "run", 3, "moe.seq_aux_loss=0.0"))
    tr = Trainer(cfg, resume=False)
    rec = tr.train_step()
    gate = tr.model.layers[1].mlp.gate
    load = torch.tensor(rec["expert_load"][0])
    bias = gate.e_score_correction_bias
    # overloaded experts were pushed down, underloaded up, by exactly u
    assert torch.equal(torch.sign(bias), torch.sign(load.mean() - load))
    assert bias.abs().max().item() == pytest.approx(0.01)
    assert abs(sum(rec["expert_load"][0]) - 1) < 1e-3 and "mfu" in rec and rec["tokens_per_s"] > 0
    tr.close()


# ---- resume ------------------------------------------------------------------------------

def test_simulated_crash_resumes_exactly(data, tmp_path):
    from nanoseek.train.trainer import Trainer, train
    ref = tmp_path / "ref"
    train(load_config(None, tiny_overrides(data, ref, 6)), resume=False)
    run = tmp_path / "crashy"
    cfg = load_config(None, tiny_overrides(data, run, 6, "run.save_every=100"))
    tr = Trainer(cfg, resume=False)
    tr.fit(stop_after=2)  # "crash" after step 2: only the checkpoint of step 2 survives
    tr.train_step()       # work done after the checkpoint is lost with the crash
    tr.close()
    del tr
    train(cfg, resume=True)
    assert losses(run) == losses(ref)
    a, b = final_state(ref), final_state(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "model" / "model.safetensors").is_file() and (run / "config.toml").is_file()


def test_sigkill_mid_run_then_resume_matches(data, tmp_path):
    """A real SIGKILL of a training process; the resumed run equals an uninterrupted one."""
    from nanoseek.train.trainer import train
    steps = 24
    run = tmp_path / "killed"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(dump_toml(load_config(None, tiny_overrides(data, run, steps, "run.save_every=3")).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.train", "--config", str(cfg_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if log.is_file():
            done = [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
            if done and done[-1]["step"] >= 7:
                proc.send_signal(signal.SIGKILL)
                killed_at = done[-1]["step"]
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < steps, proc.stderr.read().decode()[-2000:]
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 3 <= saved <= killed_at + 1 and saved % 3 == 0
    # the interrupted run resumes in a fresh process (this one); the reference never stops
    train(load_config(cfg_file), resume=True)
    ref = tmp_path / "ref"
    train(load_config(None, tiny_overrides(data, ref, steps, "run.save_every=3")), resume=False)
    assert losses(run) == losses(ref)
    a, b = final_state(ref), final_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_loss_only_on_assistant_tokens(data, tmp_path):
    from nanoseek.train.trainer import Trainer
    d = Path(data["dir"])
    cfg = load_config(None, tiny_overrides(data, tmp_path / "sft", 2, 'data.mode="sft"', "data.seq_len=256",
                                           f"data.train_file={json.dumps(str(d / 'sft_train.jsonl'))}",
                                           f"data.tokenizer={json.dumps(data['tokenizer'])}"))
    tr = Trainer(cfg, resume=False)
    x, y = tr.stream.next_batch()
    tok = tr.tokenizer
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        trained = [t for t in row_y if t != -1]
        text = tok.decode(trained)
        assert "####" in text and "<|im_end|>" in text     # the worked solution and the stop token
        assert "user" not in tok.decode([t for t, m in zip(row_x[1:], row_y) if m != -1][:3])
        question_ids = row_x[: row_x.index(tok.token_to_id("<|im_end|>"))]
        assert all(m == -1 for m in row_y[: len(question_ids) - 1])  # no loss on the prompt
    tr.close()


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parent.parent / "configs").glob("*")))
def test_shipped_configs_parse(path):
    if Path(path).name.startswith("speedrun"):
        from nanoseek.train.speedrun import _split_overrides
        knobs, stages = _split_overrides(path, [])
        assert knobs and set(stages) == {"pretrain", "sft"}
        for stage in stages.values():
            load_config(None, [], base={**stage, "data": {"shards": "x", **stage.get("data", {})}})
    else:
        load_config(path)


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_grad_accum_equals_one_big_batch(data, tmp_path, mode):
    """2 micro-batches of 2 rows == 1 batch of 4 rows: same loss and same gradient norm (in SFT
    the micro-batches hold different numbers of loss tokens: the loss is normalised globally)."""
    from nanoseek.train.trainer import train
    sft = [] if mode == "pretrain" else [
        'data.mode="sft"', "data.seq_len=256", f"data.tokenizer={json.dumps(data['tokenizer'])}",
        f"data.train_file={json.dumps(str(Path(data['dir']) / 'sft_train.jsonl'))}"]
    runs = {}
    for name, extra in (("big", ["data.batch_size=4", "data.grad_accum=1"]), ("accum", ["data.batch_size=2", "data.grad_accum=2"])):
        out = tmp_path / name
        # fp32: bf16 rounding differs with the batch shape and grows over steps (~1e-3 by step 3)
        train(load_config(None, tiny_overrides(data, out, 3, *extra, *sft, "run.bf16=false")), resume=False)
        runs[name] = [(r["loss"], r["grad_norm"]) for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    for (l1, g1), (l2, g2) in zip(runs["big"], runs["accum"]):
        assert l2 == pytest.approx(l1, rel=1e-4) and g2 == pytest.approx(g1, rel=1e-4)


def test_bf16_autocast_becomes_fp32_where_the_cpu_runs_bf16_slowly(data, tmp_path, monkeypatch, capsys):
    """run.bf16 only buys speed; on a CPU without bf16 matmul units it would cost ~7x, so the run is
    fp32, says so once, and the config and log it stores say what ran (with the fp32 peak)."""
    from nanoseek import hardware
    from nanoseek.train import trainer
    monkeypatch.setenv("NANOSEEK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hardware, "_cpu_bf16", lambda: False)
    monkeypatch.setattr(hardware, "_warned", set())  # once per process: an earlier run may have said it
    peaks = []
    monkeypatch.setattr(trainer, "peak_flops", lambda device, bf16=True: peaks.append(bf16) or 1e9)
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(data, out, 1, "run.bf16=true"))
    t = trainer.Trainer(cfg, resume=False)
    assert not cfg.run.bf16 and peaks == [False]
    assert isinstance(t._autocast(), contextlib.nullcontext)
    assert "bf16 = false" in (out / "config.toml").read_text()
    err = capsys.readouterr().err
    assert "run.bf16 -> false" in err and "no bf16 matmul units" in err
