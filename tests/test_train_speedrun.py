"""`nanoseek speedrun --quick` end to end, and the `train` CLI (flags, errors)."""

import argparse
import json

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.train import add_speedrun_parser, add_train_parser
from nanoseek.train.__main__ import main as train_main


def test_speedrun_quick_writes_report_card(tmp_path):
    from nanoseek.train.speedrun import speedrun
    out = tmp_path / "run"
    s = speedrun(out, quick=True, threads=1, progress=False, overrides=["speedrun.heldout_per_level=4"])
    for f in ("report.md", "report.png", "report.json", "pretrain/config.toml", "pretrain/log.jsonl",
              "pretrain/curves.png", "sft/config.toml", "sft/curves.png", "sft/model/model.safetensors",
              "data/tokenizer/tokenizer.json", "data/shards/index.json"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "after pretraining" in md and "after SFT" in md and "MFU" in md
    for stage in ("after_pretraining", "after_sft"):
        levels = s["accuracy"][stage]["levels"]
        assert sorted(levels) == [1, 2] and all(v["n"] == 4 for v in levels.values())
    assert s["pretrain"]["final_loss"] < s["pretrain"]["first_loss"]  # it learns something
    assert s["times_s"]["total"] > 0 and set(s["times_s"]) >= {"pretrain", "sft", "eval after SFT"}
    assert json.loads((out / "report.json").read_text())["model"]["params"] == s["model"]["params"]


def test_cli_parsers_and_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_train_parser(sub)
    add_speedrun_parser(sub)
    args = parser.parse_args(["train", "--steps", "5", "--lora", "--lora-targets", "q_proj,v_proj", "--set", "optim.lr=1e-3"])
    from nanoseek.train.cli import overrides_from_args
    from nanoseek.train.config import load_config
    cfg = load_config(None, overrides_from_args(args) + ['data.shards="x"'])
    assert cfg.schedule.steps == 5 and cfg.lora.enabled and cfg.lora.targets == ["q_proj", "v_proj"] and cfg.optim.lr == 1e-3
    assert parser.parse_args(["speedrun", "--quick"]).quick
    # user errors are one line naming the field
    assert train_main(["--set", "optim.nope=1"]) == 1
    assert "optim.nope" in capsys.readouterr().err
    assert train_main(["--shards", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(NanoseekError, match="speedrun"):
        from nanoseek.train.speedrun import speedrun
        speedrun(tmp_path, quick=True, overrides=["speedrun.bogus=1"])


def test_speedrun_overrides_reach_each_stage(tmp_path):
    from nanoseek.train.speedrun import _split_overrides
    cfg = tmp_path / "s.yaml"
    cfg.write_text("speedrun:\n  pretrain_steps: 5\nsft:\n  optim:\n    lr: 0.002\n")
    knobs, stages = _split_overrides(cfg, ["speedrun.sft_steps=3", "pretrain.optim.muon_lr=0.01", "sft.data.seq_len=64"])
    assert knobs == {"pretrain_steps": 5, "sft_steps": 3}
    assert stages["pretrain"] == {"optim": {"muon_lr": 0.01}}
    assert stages["sft"] == {"optim": {"lr": 0.002}, "data": {"seq_len": 64}}
    with pytest.raises(NanoseekError, match="pretrain.lr"):
        _split_overrides(None, ["pretrain.lr=1"])
