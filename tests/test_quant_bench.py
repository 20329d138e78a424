"""bench/quant.py end to end at toy sizes: the speedrun mode (held-out perplexity and the
speedrun's own held-out accuracy) with a GSM8K column, its files, and bad input."""

import json

import pytest
import torch

from tests.fixtures import load_bench

PRECISIONS = ["fp32", "bf16", "int8", "int8-dynamic", "int4", "fp8"]


@pytest.fixture(scope="module")
def bench():
    return load_bench("quant")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A toy speedrun (a few seconds): RUN/sft/model with its tokenizer, RUN/data/heldout.jsonl."""
    from nanoseek.train.speedrun import speedrun
    out = tmp_path_factory.mktemp("speedrun")
    n = torch.get_num_threads()
    try:
        speedrun(out, quick=True, threads=1, progress=False, overrides=["speedrun.heldout_per_level=3"])
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"question": f"Tom has {a} apples and buys 2 more. How many now?",
                                        "answer": f"{a} + 2 = <<{a}+2={a + 2}>>{a + 2}\n#### {a + 2}"}) + "\n"
                            for a in (3, 7, 11)))
    return path


@pytest.mark.slow
def test_speedrun_mode_with_gsm8k_writes_every_output(bench, run_dir, gsm8k_file, tmp_path, capsys):
    out = tmp_path / "results"
    record = bench.main(["--model", str(run_dir / "sft"), "--repeats", "1", "--decode-tokens", "4",
                         "--gsm8k-data", str(gsm8k_file), "--gsm8k-limit", "2", "--gsm8k-max-tokens", "6",
                         "--out", str(out)])
    rows = {r["precision"]: r for r in record["results"]}
    assert list(rows) == PRECISIONS
    meta = record["meta"]
    assert meta["heldout_problems"] == 6 and meta["heldout_docs"] == 6  # 2 levels x 3, all of them
    assert meta["heldout_prompt"] == "chat" and meta["heldout_max_tokens"] == 24  # the quick run's knob
    # the speedrun's own measurement, recomputed here on the same bf16 weights
    import nanoseek
    from nanoseek.train.evaluate import accuracy_by_level
    model, tok = nanoseek.load(run_dir / "sft" / "model", "bf16")
    heldout = [json.loads(line) for line in open(run_dir / "data" / "heldout.jsonl")]
    assert rows["bf16"]["heldout_accuracy"] == round(accuracy_by_level(model, tok, heldout, chat=True,
                                                                       max_tokens=24)["overall"], 4)
    for r in rows.values():
        assert r["heldout_n"] == 6 and 0 <= r["heldout_accuracy"] <= 1 and set(r["heldout_levels"]) == {"1", "2"}
        assert r["gsm8k_n"] == 2 and len(r["gsm8k_answers"]) == 2 and 0 <= r["gsm8k"] <= 1
        assert r["perplexity"] > 1 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["file_mib"] > 0
    assert rows["bf16"]["gsm8k_same_as_bf16"] == 1.0
    assert rows["int8"]["file_mib"] < rows["bf16"]["file_mib"] < rows["fp32"]["file_mib"]
    assert json.loads((out / "quant_speedrun.json").read_text())["results"] == record["results"]
    md = (out / "quant_speedrun.md").read_text()
    assert "| precision | file MiB | tensors MiB | RSS MiB | decode tok/s | prefill tok/s | perplexity |" in md
    assert "held-out acc" in md and "GSM8K strict / flexible" in md
    assert md.count("\n| ") == len(PRECISIONS) + 1  # the header, then a row each
    assert (out / "quant_speedrun.png").stat().st_size > 1000
    samples = out / "quant_speedrun_gsm8k" / "int8" / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 2
    assert "| int8 |" in capsys.readouterr().out


def test_bad_input_is_one_line_naming_the_flag(bench, tmp_path, gsm8k_file):
    stage = tmp_path / "run" / "sft"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "config.json").write_text("{}")
    cases = [
        (["--data", str(tmp_path / "none.jsonl")], "--data "),
        (["--gsm8k-data", str(tmp_path / "none.jsonl"), "--data", str(gsm8k_file)], "--gsm8k-data "),
        (["--gsm8k-limit", "-1", "--data", str(gsm8k_file)], "--gsm8k-limit must be >= 0"),
        (["--gsm8k-format", "gsm8k", "--gsm8k-data", str(gsm8k_file), "--data", str(gsm8k_file)],
         "--gsm8k-fewshot-data "),
        (["--model", str(stage)], "(pass --heldout)"),  # a speedrun stage whose run has no data/
        (["--model", str(stage), "--heldout", str(tmp_path / "none.jsonl")], "--heldout "),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        text = str(e.value.code)
        assert message in text and "\n" not in text, (argv, text)


def test_speedrun_layout_and_spread(bench, tmp_path):
    run = tmp_path / "run"
    for d in ("sft/model", "data"):
        (run / d).mkdir(parents=True)
    (run / "sft" / "model" / "config.json").write_text("{}")
    expected = (run / "sft" / "model", run / "data" / "heldout.jsonl", "sft")
    assert bench.speedrun_layout(str(run / "sft")) == expected
    assert bench.speedrun_layout(str(run / "sft" / "model")) == expected
    assert bench.speedrun_layout(str(tmp_path)) is None and bench.speedrun_layout(None) is None
    assert bench.spread(list(range(10)), 3) == [0, 3, 6] and bench.spread([1, 2], None) == [1, 2]
