import argparse
import json
import random

import numpy as np
import pytest

from nanoseek.data.cli import add_data_parser, parse_levels
from nanoseek.data.problems import reward
from nanoseek.data.shards import PackedDataset, read_index
from nanoseek.data.tokenizer_train import load_tokenizer
from nanoseek.errors import NanoseekError


def run(*argv):
    parser = argparse.ArgumentParser(prog="nanoseek")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def pseudo_text(seed, n_words=150):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnoprstuvy") for _ in range(rng.randint(3, 8))) for _ in range(n_words)]
    return " ".join(words) + "."


@pytest.fixture
def inputs(tmp_path):
    docs = [pseudo_text(i) for i in range(30)]
    near = docs[0].split()
    near[70] = "changed"
    rows = docs + [docs[1], " ".join(near), "too short"]
    plain = tmp_path / "docs.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    chat = tmp_path / "chat.jsonl"
    conv = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    chat.write_text(json.dumps(conv) + "\n")
    notes = tmp_path / "notes.txt"
    notes.write_text(pseudo_text(100) + "\n\n" + pseudo_text(101) + "\n")
    return [plain, chat, notes]


def test_prepare_end_to_end(tmp_path, inputs, capsys):
    out = tmp_path / "ds"
    assert run("prepare", "--input", *map(str, inputs), "--out", str(out), "--vocab-size", "400",
               "--seq-len", "64", "--split-blank-lines") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["removed"] == {"exact_duplicate": 1, "near_duplicate": 1, "too_few_chars": 1}
    assert report["kept_documents"] == 30 + 1 + 2  # jsonl docs, the chat, two paragraphs
    assert report["packing"]["seq_len"] == 64
    index = read_index(out)
    assert index["num_documents"] == 33
    tok = load_tokenizer(out / "tokenizer")
    assert index["tokenizer_hash"] == tok.fingerprint
    # the chat document is stored rendered with the chat template
    clean = [json.loads(line) for line in (out / "clean.jsonl").read_text().splitlines()]
    chat_pos = next(i for i, r in enumerate(clean) if "messages" in r)
    shard = index["shards"][0]
    arr = np.memmap(out / shard["file"], dtype=np.uint16, mode="r")
    bounds = shard["doc_offsets"] + [shard["num_tokens"]]
    chat_ids = arr[bounds[chat_pos] : bounds[chat_pos + 1]].tolist()
    assert tok.decode(chat_ids) == tok.apply_chat_template(clean[chat_pos]["messages"])
    x, y = next(PackedDataset(out, seq_len=64, batch_size=2))
    assert x.shape == (2, 64) and (x[:, 0] == tok.bos_token_id).all()
    assert "kept 33/36 documents" in capsys.readouterr().out


def test_prepare_with_existing_tokenizer_and_no_dedup(tmp_path, inputs):
    tok_dir = tmp_path / "tok"
    assert run("train-tokenizer", "--input", str(inputs[0]), "--vocab-size", "300", "--out", str(tok_dir)) == 0
    out = tmp_path / "ds"
    run("prepare", "--input", str(inputs[0]), "--out", str(out), "--tokenizer", str(tok_dir),
        "--no-dedup", "--no-filter")
    assert json.loads((out / "report.json").read_text())["removed"] == {}
    assert read_index(out)["num_documents"] == 33
    assert not (out / "tokenizer").exists()


def test_prepare_errors(tmp_path, inputs):
    with pytest.raises(NanoseekError, match="no such file"):
        run("prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    only_short = tmp_path / "short.txt"
    only_short.write_text("tiny")
    with pytest.raises(NanoseekError, match="no documents left after cleaning"):
        run("prepare", "--input", str(only_short), "--out", str(tmp_path / "o"))
    with pytest.raises(NanoseekError, match="--near-dup-threshold"):
        run("prepare", "--input", str(only_short), "--out", str(tmp_path / "o2"), "--near-dup-threshold", "0")
    assert not (tmp_path / "o2").exists()  # rejected before any work
    with pytest.raises(NanoseekError, match="no such tokenizer file"):
        run("prepare", "--input", str(only_short), "--out", str(tmp_path / "o3"), "--tokenizer", str(tmp_path))


def test_problems_command(tmp_path):
    out = tmp_path / "p.jsonl"
    assert run("problems", "--n", "7", "--levels", "2-4", "--seed", "3", "--out", str(out)) == 0
    problems = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["level"] for p in problems] == [2, 2, 2, 3, 3, 4, 4]
    assert all(reward(p["answer"], p["final"]) == 1.0 for p in problems)


def test_parse_levels():
    assert parse_levels("1-5") == [1, 2, 3, 4, 5]
    assert parse_levels("4,1-2") == [1, 2, 4]
    for bad in ("0-2", "x", "6", "3-"):
        with pytest.raises(NanoseekError, match="--levels"):
            parse_levels(bad)
