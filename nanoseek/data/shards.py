"""Tokenized shards on disk, BOS-aligned packed pretraining batches, and chat SFT batches.

On disk, a shard directory holds raw token files (shard_00000.bin, ...; numpy memmaps of
uint16, or uint32 when the vocab has 65536 tokens or more) and index.json:

    {"format": "nanoseek-shards", "version": 1, "dtype": "uint16", "vocab_size": ...,
     "bos_token_id": ..., "doc_end_token_id": ..., "tokenizer_hash": ...,
     "num_documents": ..., "num_tokens": ...,
     "shards": [{"file": "shard_00000.bin", "num_tokens": ..., "num_documents": ...,
                 "doc_offsets": [0, 913, ...]}], "meta": {...}}

Each document is stored as BOS + tokens + <|end_of_text|> and never spans two shards.
index.json is written last, so a directory with an index is a complete one.

Tokenizers are duck-typed: anything with encode(text, add_special_tokens=...) ->
list[int], bos_token_id and eos_token_id works (our ChatTokenizer, a transformers one).
"""

import hashlib
import json
import os
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from nanoseek.errors import NanoseekError

INDEX_FILE = "index.json"
FORMAT = "nanoseek-shards"
VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MiB per uint16 shard
IGNORE_INDEX = -1  # target value the loss skips (SFT padding and non-assistant tokens)

BOS = "<|begin_of_text|>"
EOT = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


# -----------------------------------------------------------------------------
# Tokenizer duck-typing helpers


def special_id(tok, token: str) -> int | None:
    """Id of a special token for our tokenizer (token_to_id) or a transformers one; None if absent."""
    if hasattr(tok, "token_to_id"):
        return tok.token_to_id(token)
    if hasattr(tok, "convert_tokens_to_ids"):
        i = tok.convert_tokens_to_ids(token)
        return None if i is None or i == getattr(tok, "unk_token_id", None) else i
    if hasattr(tok, "get_vocab"):
        return tok.get_vocab().get(token)
    return None


def vocab_size_of(tok) -> int:
    """Vocab size including added tokens (transformers' .vocab_size excludes them, len() does not)."""
    try:
        return len(tok)
    except TypeError:
        pass
    if hasattr(tok, "get_vocab_size"):
        return tok.get_vocab_size()
    return int(tok.vocab_size)


def tokenizer_hash(tok) -> str:
    """Fingerprint stored in the index, so shards are never read with a different tokenizer."""
    fingerprint = getattr(tok, "fingerprint", None)
    if fingerprint:
        return fingerprint
    for attr in ("backend_tokenizer", "backend"):  # transformers / nanoseek.tokenizer wrappers
        backend = getattr(tok, attr, None)
        if hasattr(backend, "to_str"):
            return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]
    # unknown tokenizer: hash its behaviour on a probe string
    probe = "The quick brown fox, 12345 ümlaut\n\tend."
    data = json.dumps([vocab_size_of(tok), tok.bos_token_id, tok.eos_token_id, _encode(tok, probe)])
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def _encode(tok, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))


def _encode_batch(tok, texts: list[str]) -> list[list[int]]:
    # our ChatTokenizer (and tokenizers.Tokenizer) encode a whole batch on the Rust side in parallel
    if hasattr(tok, "encode_batch"):
        return [list(getattr(e, "ids", e)) for e in tok.encode_batch(texts, add_special_tokens=False)]
    return [_encode(tok, t) for t in texts]


def _required_id(tok, token: str) -> int:
    i = special_id(tok, token)
    if i is None:
        raise NanoseekError(f"tokenizer has no {token} token")
    return i


def _bos_id(tok) -> int:
    if getattr(tok, "bos_token_id", None) is None:
        raise NanoseekError("tokenizer has no BOS token; packing needs one to align documents")
    return tok.bos_token_id


def doc_end_id(tok) -> int:
    """Pretraining documents end with <|end_of_text|> when the tokenizer has it, else its EOS."""
    i = special_id(tok, EOT)
    if i is None:
        i = tok.eos_token_id
    if i is None:
        raise NanoseekError("tokenizer has neither <|end_of_text|> nor an EOS token")
    return i


# -----------------------------------------------------------------------------
# Tokenizing documents


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def tokenize_documents(docs: Iterable[str | list[dict]], tok, batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids per document: BOS + text + <|end_of_text|>; a list of messages renders as a chat."""
    bos, end = _bos_id(tok), doc_end_id(tok)
    for batch in _batched(docs, batch_size):
        texts = [d for d in batch if isinstance(d, str)]
        encoded = iter(_encode_batch(tok, texts))
        for doc in batch:
            if isinstance(doc, str):
                yield [bos] + next(encoded) + [end]
            else:
                yield render_chat(doc, tok)[0]


# -----------------------------------------------------------------------------
# Writing and reading shards


class ShardWriter:
    """Append documents (lists of ids); rolls to a new shard file after `shard_tokens` tokens."""

    def __init__(self, out_dir: str | Path, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {arr.min()}, max {arr.max()}")
        self._pending.append(arr.astype(self.dtype))
        self._pending_tokens += arr.size
        if self._pending_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard_{len(self.shards):05d}.bin"
        lengths = np.array([len(a) for a in self._pending], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        mm = np.memmap(self.out_dir / name, dtype=self.dtype, mode="w+", shape=(int(lengths.sum()),))
        mm[:] = np.concatenate(self._pending)
        mm.flush()
        del mm
        self.shards.append({
            "file": name,
            "num_tokens": int(lengths.sum()),
            "num_documents": len(lengths),
            "doc_offsets": offsets.tolist(),
        })
        self._pending, self._pending_tokens = [], 0

    def close(self, **header) -> dict:
        """Write the last shard and index.json; header adds fields (bos_token_id, tokenizer_hash, meta...)."""
        self._flush()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            **header,
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "shards": self.shards,
        }
        tmp = self.out_dir / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index) + "\n", encoding="utf-8")
        os.replace(tmp, self.out_dir / INDEX_FILE)  # atomic: readers never see half an index
        return index


def write_shards(
    docs: Iterable[str | list[dict]],
    tok,
    out_dir: str | Path,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_size: int = 256,
    meta: dict | None = None,
    progress=None,
) -> dict:
    """Tokenize documents (texts or chat message lists) into shards; returns the index.

    progress: optional callable(n_docs) called after each document (e.g. a tqdm's update).
    """
    writer = ShardWriter(out_dir, vocab_size_of(tok), shard_tokens)
    for ids in tokenize_documents(docs, tok, batch_size):
        writer.add(ids)
        if progress is not None:
            progress(1)
    return writer.close(
        bos_token_id=_bos_id(tok),
        doc_end_token_id=doc_end_id(tok),
        tokenizer_hash=tokenizer_hash(tok),
        meta=meta or {},
    )


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_FILE
    if not path.is_file():
        raise NanoseekError(f"{path}: no shard index (run `nanoseek data prepare` first)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise NanoseekError(f"{path}: not a {FORMAT} v{VERSION} index")
    return index


def open_shards(shard_dir: str | Path, index: dict) -> list[np.ndarray]:
    """Read-only memmaps of every shard, checked against the index's token counts."""
    arrays = []
    for shard in index["shards"]:
        path = Path(shard_dir) / shard["file"]
        if not path.is_file():
            raise NanoseekError(f"{path}: shard listed in the index is missing")
        mm = np.memmap(path, dtype=np.dtype(index["dtype"]), mode="r")
        if len(mm) != shard["num_tokens"]:
            raise NanoseekError(f"{path}: {len(mm)} tokens on disk, index says {shard['num_tokens']}")
        arrays.append(mm)
    return arrays


# -----------------------------------------------------------------------------
# Packed pretraining batches


class PackedDataset:
    """Endless (or `epochs`-long) stream of (inputs, targets) batches of BOS-aligned packed rows.

    Each row has seq_len + 1 tokens and starts with a document's BOS. Rows are filled with
    best-fit packing (as nanochat does): from a buffer of `buffer_size` documents, take the
    longest one that fits the space left; when none fits, crop the shortest to fill the row
    and discard the rest of it. Every token a row sees therefore follows its own document's
    BOS, and the only waste is the cropped tails (see stats()).

    Documents are visited in a per-epoch permutation of a seeded RNG; with world_size > 1
    each rank takes every world_size-th document of it. state_dict() captures the exact
    position (epoch, cursor, buffered documents), so a restarted run continues with the
    batch that would have come next.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        buffer_size: int = 64,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1 or buffer_size < 1:
            raise NanoseekError(
                f"seq_len, batch_size and buffer_size must be positive, got {seq_len}, {batch_size}, {buffer_size}")
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        self.arrays = open_shards(self.shard_dir, self.index)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.buffer_size, self.epochs, self.rank, self.world_size = buffer_size, epochs, rank, world_size
        self.doc_shard, self.doc_start, self.doc_len = self._document_table()
        if len(self.doc_len) < world_size:
            raise NanoseekError(f"{self.shard_dir}: {len(self.doc_len)} documents cannot feed {world_size} ranks")
        self._order_epoch, self._order = -1, None
        self.epoch, self.cursor, self.buffer = 0, 0, []
        self.rows = self.tokens_in_rows = self.tokens_cropped = 0

    def _document_table(self):
        shard_ids, starts, lengths = [], [], []
        for s, shard in enumerate(self.index["shards"]):
            offsets = np.asarray(shard["doc_offsets"], dtype=np.int64)
            shard_ids.append(np.full(len(offsets), s, dtype=np.int32))
            starts.append(offsets)
            lengths.append(np.diff(np.append(offsets, shard["num_tokens"])))
        if not starts:
            raise NanoseekError(f"{self.shard_dir}: the shard index lists no documents")
        return np.concatenate(shard_ids), np.concatenate(starts), np.concatenate(lengths)

    # --- document order -------------------------------------------------------

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.doc_len)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order, self._order_epoch = order[self.rank :: self.world_size], epoch
        return self._order

    def _refill(self) -> None:
        """Top the buffer up to buffer_size documents, moving to the next epoch when one ends."""
        while len(self.buffer) < self.buffer_size:
            order = self._order_for(self.epoch)
            if self.cursor == len(order):
                if self.epochs is not None and self.epoch + 1 >= self.epochs:
                    return  # finite run: the buffer just drains
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            self.buffer.append(int(order[self.cursor]))
            self.cursor += 1

    # --- packing --------------------------------------------------------------

    def _pick(self, space: int) -> tuple[int, int]:
        """(buffer position, tokens to take): the longest doc that fits, else crop the shortest."""
        lengths = self.doc_len[self.buffer]
        fits = np.flatnonzero(lengths <= space)
        if len(fits):
            pos = int(fits[np.argmax(lengths[fits])])  # argmax: first of equals, deterministic
            return pos, int(lengths[pos])
        return int(np.argmin(lengths)), space

    def next_row(self) -> np.ndarray | None:
        """One packed row of seq_len + 1 tokens, or None when a finite run is exhausted."""
        row_len = self.seq_len + 1
        row = np.empty(row_len, dtype=np.int64)
        filled = 0
        while filled < row_len:
            self._refill()
            if not self.buffer:
                return None  # the partial row is dropped with the end of the data
            pos, take = self._pick(row_len - filled)
            doc = self.buffer.pop(pos)
            start = self.doc_start[doc]
            row[filled : filled + take] = self.arrays[self.doc_shard[doc]][start : start + take]
            self.tokens_cropped += int(self.doc_len[doc]) - take
            filled += take
        self.rows += 1
        self.tokens_in_rows += row_len
        return row

    def __iter__(self):
        return self

    def __next__(self):
        """(inputs, targets): int64 tensors of shape (batch_size, seq_len), targets shifted by one."""
        import torch

        rows = []
        for _ in range(self.batch_size):
            row = self.next_row()
            if row is None:
                raise StopIteration
            rows.append(row)
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def stats(self) -> dict:
        """Packing waste so far: tokens cropped off documents / tokens taken from documents."""
        used = self.tokens_in_rows + self.tokens_cropped
        return {
            "rows": self.rows,
            "epoch": self.epoch,
            "tokens_in_rows": self.tokens_in_rows,
            "tokens_cropped": self.tokens_cropped,
            "waste_fraction": self.tokens_cropped / used if used else 0.0,
        }

    # --- resumable position ---------------------------------------------------

    def _config(self) -> dict:
        return {
            "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle, "buffer_size": self.buffer_size,
            "rank": self.rank, "world_size": self.world_size, "num_documents": len(self.doc_len),
            "tokenizer_hash": self.index.get("tokenizer_hash"),
        }

    def state_dict(self) -> dict:
        return {
            "config": self._config(),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "buffer": list(self.buffer),
            "rows": self.rows,
            "tokens_in_rows": self.tokens_in_rows,
            "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state: dict) -> None:
        ours = self._config()
        diff = {k: (state["config"].get(k), v) for k, v in ours.items() if state["config"].get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise NanoseekError(f"data loader state does not match this dataset ({detail})")
        self.epoch, self.cursor, self.buffer = state["epoch"], state["cursor"], list(state["buffer"])
        self.rows = state["rows"]
        self.tokens_in_rows, self.tokens_cropped = state["tokens_in_rows"], state["tokens_cropped"]


def packing_stats(shard_dir: str | Path, seq_len: int, buffer_size: int = 64, seed: int = 0) -> dict:
    """Pack one epoch (without building batches) and report rows and waste."""
    ds = PackedDataset(shard_dir, seq_len, batch_size=1, seed=seed, buffer_size=buffer_size, epochs=1)
    while ds.next_row() is not None:
        pass
    return ds.stats()


# -----------------------------------------------------------------------------
# Chat SFT


def render_chat(messages: list[dict], tok) -> tuple[list[int], list[int]]:
    """ChatML ids for a conversation and a loss mask that is 1 on assistant tokens only.

    Layout (as the tokenizer's chat template): BOS, then per message
    <|im_start|>{role}\\n{content}<|im_end|>\\n. A tokenizer whose BOS *is* <|im_start|>
    (SmolLM2) gets no separate BOS: its template starts with the first message's own.
    The mask covers an assistant message's content and its closing <|im_end|> (so the model
    learns to stop), never the headers.
    """
    bos, im_start, im_end = _bos_id(tok), _required_id(tok, IM_START), _required_id(tok, IM_END)
    newline = _encode(tok, "\n")
    ids, mask = ([bos], [0]) if bos != im_start else ([], [])
    for msg in messages:
        header, body = _split_header(tok, msg["role"], msg["content"])
        train = int(msg["role"] == "assistant")
        ids += [im_start] + header + body + [im_end] + newline
        mask += [0] * (1 + len(header)) + [train] * (len(body) + 1) + [0] * len(newline)
    return ids, mask


def _split_header(tok, role: str, content: str) -> tuple[list[int], list[int]]:
    """Tokens of "{role}\\n" and of the content.

    The text between special tokens is encoded in one piece, exactly as encoding the whole
    rendered chat would; the header/content boundary is found by encoding the header alone.
    In the rare case a token straddles the boundary (content starting with whitespace),
    the two parts are encoded separately so the mask stays exact.
    """
    header = _encode(tok, f"{role}\n")
    joint = _encode(tok, f"{role}\n{content}")
    if joint[: len(header)] == header:
        return header, joint[len(header) :]
    return header, _encode(tok, content)


def sft_collate(examples: list[tuple[list[int], list[int]]], pad_id: int, max_len: int | None = None) -> dict:
    """Right-padded batch from (ids, mask) pairs.

    Returns int64 tensors input_ids (B, T) and targets (B, T), where targets are the next
    tokens with IGNORE_INDEX wherever the mask is 0 or the row is padding, and loss_mask
    (B, T) = targets != IGNORE_INDEX. T = longest example - 1, capped at max_len.
    """
    import torch

    rows = []
    for ids, mask in examples:
        if max_len is not None:
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        rows.append((ids[:-1], targets))
    width = max(len(x) for x, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": targets != IGNORE_INDEX}


def sft_batches(
    conversations: list[list[dict]],
    tok,
    batch_size: int,
    max_len: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> Iterator[dict]:
    """One epoch of padded SFT batches in a seeded order.

    Conversations with no assistant token left (after truncation to max_len) are skipped:
    they would contribute a batch row with nothing to learn and a zero loss denominator.
    """
    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = _required_id(tok, "<|pad|>")
    order = np.random.default_rng(seed).permutation(len(conversations)) if shuffle else range(len(conversations))
    batch = []
    for i in order:
        ids, mask = render_chat(conversations[i], tok)
        if not any(mask[1 : (max_len + 1 if max_len else None)]):
            continue
        batch.append((ids, mask))
        if len(batch) == batch_size:
            yield sft_collate(batch, pad_id, max_len)
            batch = []
    if batch:
        yield sft_collate(batch, pad_id, max_len)
