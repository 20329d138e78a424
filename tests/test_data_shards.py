import json
import random

import numpy as np
import pytest

from nanoseek.data.shards import (
    IGNORE_INDEX,
    PackedDataset,
    ShardWriter,
    packing_stats,
    read_index,
    render_chat,
    sft_batches,
    sft_collate,
    tokenize_documents,
    write_shards,
)
from nanoseek.data.tokenizer_train import load_tokenizer, save_tokenizer, train_tokenizer
from nanoseek.errors import NanoseekError

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|pad|>"]


class ByteTokenizer:
    """Minimal duck-typed tokenizer: specials are ids 0..6, byte b is id 7 + b."""

    bos_token_id, eos_token_id, pad_token_id = 0, 3, 6

    def __init__(self, vocab_size=263):
        self.size = vocab_size

    def __len__(self):
        return self.size

    def token_to_id(self, token):
        return SPECIALS.index(token) if token in SPECIALS else None

    def encode(self, text, add_special_tokens=True):
        ids = [7 + b for b in text.encode("utf-8")]
        return [0] + ids if add_special_tokens else ids


def make_texts(n, seed=0, lo=1, hi=120):
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture
def shard_dir(tmp_path):
    write_shards(make_texts(200), ByteTokenizer(), tmp_path, shard_tokens=3000)
    return tmp_path


# --- writing -------------------------------------------------------------------


def test_tokenize_documents_adds_bos_and_end():
    tok = ByteTokenizer()
    (ids,) = tokenize_documents(["ab"], tok)
    assert ids == [0, 7 + ord("a"), 7 + ord("b"), 1]


def test_shard_round_trip(shard_dir):
    texts = make_texts(200)
    index = read_index(shard_dir)
    assert index["dtype"] == "uint16" and index["bos_token_id"] == 0 and index["doc_end_token_id"] == 1
    assert len(index["shards"]) > 1  # rolled over at 3000 tokens
    assert index["num_documents"] == 200
    assert index["num_tokens"] == sum(len(t.encode()) + 2 for t in texts)
    assert index["tokenizer_hash"]
    # every document reads back exactly, from whichever shard holds it
    docs = []
    for shard in index["shards"]:
        arr = np.memmap(shard_dir / shard["file"], dtype=np.uint16, mode="r")
        assert len(arr) == shard["num_tokens"]
        bounds = shard["doc_offsets"] + [shard["num_tokens"]]
        docs += [arr[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    assert docs == [[0] + [7 + b for b in t.encode()] + [1] for t in texts]


def test_large_vocab_uses_uint32(tmp_path):
    class Big(ByteTokenizer):
        def encode(self, text, add_special_tokens=True):
            return [70_000 + len(text)]

    index = write_shards(["abc"], Big(vocab_size=80_000), tmp_path)
    assert index["dtype"] == "uint32"
    assert np.memmap(tmp_path / "shard_00000.bin", dtype=np.uint32, mode="r").tolist() == [0, 70_003, 1]


def test_out_of_range_token_rejected(tmp_path):
    writer = ShardWriter(tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="out of range"):
        writer.add([5, 100])


def test_missing_index(tmp_path):
    with pytest.raises(NanoseekError, match="no shard index"):
        read_index(tmp_path)


def test_truncated_shard_detected(shard_dir):
    (shard_dir / "shard_00000.bin").write_bytes(b"\0\0")
    with pytest.raises(NanoseekError, match="tokens on disk, index says"):
        PackedDataset(shard_dir, seq_len=32, batch_size=2)


# --- packing ---------------------------------------------------------------------


def all_docs(shard_dir):
    texts = make_texts(200)
    return [[0] + [7 + b for b in t.encode()] + [1] for t in texts]


def test_rows_start_with_bos_and_hold_document_prefixes(shard_dir):
    docs = {tuple(d) for d in all_docs(shard_dir)}
    prefixes = {d[:k] for d in docs for k in range(1, len(d) + 1)}
    ds = PackedDataset(shard_dir, seq_len=64, batch_size=4, seed=1)
    for _ in range(30):
        x, y = next(ds)
        assert x.shape == y.shape == (4, 64)
        assert (x[:, 1:] == y[:, :-1]).all()
        rows = np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
        for row in rows:
            assert row[0] == 0  # BOS-aligned
            starts = np.flatnonzero(row == 0).tolist() + [len(row)]
            for a, b in zip(starts, starts[1:]):
                assert tuple(row[a:b].tolist()) in prefixes  # each piece is a document (or its head)


def test_one_epoch_uses_each_document_at_most_once_and_reports_waste(shard_dir):
    docs = all_docs(shard_dir)
    ds = PackedDataset(shard_dir, seq_len=100, batch_size=1, epochs=1)
    pieces = 0
    while (row := ds.next_row()) is not None:
        pieces += int((row == 0).sum())
    assert pieces <= len(docs)
    stats = ds.stats()
    assert stats["tokens_in_rows"] == stats["rows"] * 101
    assert 0 <= stats["waste_fraction"] < 0.5
    assert stats["tokens_in_rows"] + stats["tokens_cropped"] <= sum(map(len, docs))
    assert packing_stats(shard_dir, 100) == stats


def test_best_fit_no_waste_when_documents_fit_exactly(tmp_path):
    # documents of 10 tokens (BOS + 8 bytes + end) pack 4 to a row of 40 with nothing cropped
    write_shards(["abcdefgh"] * 40, ByteTokenizer(), tmp_path)
    ds = PackedDataset(tmp_path, seq_len=39, batch_size=1, epochs=1)
    rows = 0
    while ds.next_row() is not None:
        rows += 1
    assert rows == 10 and ds.stats()["tokens_cropped"] == 0


def doc_of_length(n, ch):
    return ch * (n - 2)  # BOS + bytes + end


def test_best_fit_takes_the_longest_document_that_fits(tmp_path):
    texts = [doc_of_length(10, "a"), doc_of_length(25, "b"), doc_of_length(15, "c")]
    write_shards(texts, ByteTokenizer(), tmp_path)
    ds = PackedDataset(tmp_path, seq_len=39, batch_size=1, shuffle=False, epochs=1)
    row = ds.next_row()
    ids = [0] + [7 + ord("b")] * 23 + [1] + [0] + [7 + ord("c")] * 13 + [1]  # 25 + 15 = 40
    assert row.tolist() == ids


def test_when_nothing_fits_the_shortest_document_is_cropped(tmp_path):
    texts = [doc_of_length(50, "a"), doc_of_length(30, "b"), doc_of_length(40, "c")]
    write_shards(texts, ByteTokenizer(), tmp_path)
    ds = PackedDataset(tmp_path, seq_len=19, batch_size=1, shuffle=False, epochs=1)
    assert ds.next_row().tolist() == [0] + [7 + ord("b")] * 19
    assert ds.stats()["tokens_cropped"] == 10


def test_shuffle_is_deterministic_by_seed(shard_dir):
    def first(seed):
        ds = PackedDataset(shard_dir, seq_len=32, batch_size=4, seed=seed)
        return [next(ds)[0] for _ in range(3)]

    a, b, c = first(0), first(0), first(1)
    assert all((p == q).all() for p, q in zip(a, b))
    assert not all((p == q).all() for p, q in zip(a, c))


@pytest.mark.parametrize("skip", [0, 3, 40])  # 40 batches cross several epoch boundaries
def test_resume_gives_the_exact_next_batches(shard_dir, skip):
    ds = PackedDataset(shard_dir, seq_len=48, batch_size=3, seed=5, buffer_size=8)
    for _ in range(skip):
        next(ds)
    state = json.loads(json.dumps(ds.state_dict()))  # must survive a checkpoint file
    expected = [next(ds) for _ in range(25)]

    resumed = PackedDataset(shard_dir, seq_len=48, batch_size=3, seed=5, buffer_size=8)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(25)]
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert (x1 == x2).all() and (y1 == y2).all()
    assert resumed.stats() == ds.stats()
    if skip == 40:
        assert ds.epoch >= 1


def test_resume_without_state_differs(shard_dir):
    # guards the test above: a fresh iterator does not happen to produce the same batches
    ds = PackedDataset(shard_dir, seq_len=48, batch_size=3, seed=5)
    for _ in range(3):
        next(ds)
    fresh = PackedDataset(shard_dir, seq_len=48, batch_size=3, seed=5)
    assert not (next(ds)[0] == next(fresh)[0]).all()


def test_state_from_another_configuration_is_rejected(shard_dir):
    state = PackedDataset(shard_dir, seq_len=48, batch_size=3, seed=5).state_dict()
    other = PackedDataset(shard_dir, seq_len=48, batch_size=3, seed=6)
    with pytest.raises(NanoseekError, match="seed: saved 5 vs now 6"):
        other.load_state_dict(state)


def test_ranks_see_disjoint_documents(shard_dir):
    def docs_seen(rank):
        ds = PackedDataset(shard_dir, seq_len=32, batch_size=1, epochs=1, rank=rank, world_size=2)
        seen = set()
        ds._refill()
        while ds.buffer:
            seen.update(ds.buffer)
            ds.buffer.clear()
            ds._refill()
        return seen

    a, b = docs_seen(0), docs_seen(1)
    assert len(a) + len(b) == 200 and not a & b


def test_finite_epochs_stop(tmp_path):
    write_shards(make_texts(10), ByteTokenizer(), tmp_path)
    batches = list(PackedDataset(tmp_path, seq_len=16, batch_size=2, epochs=1))
    assert 0 < len(batches) < 50


# --- chat SFT ----------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>2+2=4</think>4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def chat_tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tok")
    corpus = ["What is 2+2? And 3+3? Be brief. The answer is 4 and then 6."] * 50
    save_tokenizer(train_tokenizer(corpus, vocab_size=350), out)
    return out


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_sft_mask_covers_exactly_assistant_spans(chat_tok_dir):
    tok = load_tokenizer(chat_tok_dir)
    ids, mask = render_chat(CONVERSATION, tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id
    assert masked_text(tok, ids, mask) == "<think>2+2=4</think>4<|im_end|>6<|im_end|>"
    # and the complement is everything else
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # masked spans are contiguous: one run per assistant message
    runs = sum(1 for a, b in zip([0] + mask, mask) if b and not a)
    assert runs == 2


def test_sft_ids_match_the_chat_template(chat_tok_dir):
    tok = load_tokenizer(chat_tok_dir)
    ids, _ = render_chat(CONVERSATION, tok)
    text = tok.apply_chat_template(CONVERSATION)
    assert ids == tok.encode(text, add_special_tokens=False)


def test_sft_ids_match_transformers(chat_tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(chat_tok_dir))
    ours, mask = render_chat(CONVERSATION, load_tokenizer(chat_tok_dir))
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert ours == theirs
    # works with the transformers tokenizer as the duck-typed tokenizer too
    assert render_chat(CONVERSATION, hf) == (ours, mask)


def test_sft_mask_exact_when_content_starts_with_whitespace(chat_tok_dir):
    tok = load_tokenizer(chat_tok_dir)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\n  spaced"}]
    ids, mask = render_chat(conv, tok)
    assert masked_text(tok, ids, mask) == "\n\n  spaced<|im_end|>"


def test_sft_collate_pads_and_ignores():
    examples = [([0, 10, 11, 12, 13], [0, 0, 1, 1, 1]), ([0, 20, 21], [0, 1, 0])]
    batch = sft_collate(examples, pad_id=6)
    assert batch["input_ids"].tolist() == [[0, 10, 11, 12], [0, 20, 6, 6]]
    I = IGNORE_INDEX
    assert batch["targets"].tolist() == [[I, 11, 12, 13], [20, I, I, I]]
    assert batch["loss_mask"].sum().item() == 4
    truncated = sft_collate(examples, pad_id=6, max_len=2)
    assert truncated["input_ids"].shape == (2, 2)


def test_sft_batches(chat_tok_dir):
    tok = load_tokenizer(chat_tok_dir)
    no_assistant = [{"role": "user", "content": "hello"}]
    convs = [CONVERSATION] * 5 + [no_assistant]
    batches = list(sft_batches(convs, tok, batch_size=2, seed=0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]  # the assistant-less one is skipped
    assert all((b["input_ids"][:, 0] == tok.bos_token_id).all() for b in batches)
