"""Batches for the training loop, on top of nanoseek.data (shards, packing, chat masking).

Every process reads the *same* stream and keeps its own slice of each global micro-batch, so
the data a step sees, and the saved position, do not depend on the number of processes: a
2-process run sees exactly the rows of a 1-process run with twice the batch, and a run can
resume with a different world size.

A batch is (inputs [B,T], targets [B,T]) with targets = -1 where no loss is taken.
"""


import numpy as np
import torch

from nanoseek.data.shards import IGNORE_INDEX, PackedDataset, render_chat, sft_collate
from nanoseek.errors import NanoseekError
from nanoseek.jsonl import iter_jsonl


class PretrainStream:
    """BOS-aligned packed rows from a shard directory (nanoseek.data.shards.PackedDataset)."""

    def __init__(self, shard_dir, seq_len, rows_per_rank, rank=0, world_size=1, seed=0, buffer_size=64, epochs=None):
        self.ds = PackedDataset(shard_dir, seq_len, batch_size=1, seed=seed, buffer_size=buffer_size, epochs=epochs)
        self.rows, self.rank, self.world = rows_per_rank, rank, world_size

    def next_batch(self):
        rows = []
        for _ in range(self.rows * self.world):
            row = self.ds.next_row()
            if row is None:
                return None
            rows.append(row)
        mine = torch.from_numpy(np.stack(rows[self.rank * self.rows:(self.rank + 1) * self.rows]))
        return mine[:, :-1], mine[:, 1:]

    def state_dict(self):
        return {"packed": self.ds.state_dict()}

    def load_state_dict(self, state):
        self.ds.load_state_dict(state["packed"])


def read_conversations(path) -> list[list[dict]]:
    """Chat JSONL ({"messages": [...]}) or problems JSONL ({question, answer}) -> message lists."""
    convs = []
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj.get("messages"), list):
            convs.append(obj["messages"])
        elif isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
            convs.append(problem_chat(obj["question"], obj["answer"]))
        else:
            raise NanoseekError(f"{path}:{lineno}: expected {{\"messages\": [...]}} or {{\"question\", \"answer\"}}")
    if not convs:
        raise NanoseekError(f"{path}: no conversations")
    return convs


def problem_chat(question: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": question}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


class SFTStream:
    """Padded chat batches, loss on assistant tokens only; endless epochs in seeded orders.

    Conversations are tokenised once up front (they are small). The position is (epoch,
    cursor) in the epoch's permutation: a resumed run picks up at the next conversation.
    """

    def __init__(self, conversations, tok, seq_len, rows_per_rank, rank=0, world_size=1, seed=0, pad_id=None):
        self.examples = []
        for conv in conversations:
            ids, mask = render_chat(conv, tok)
            if any(mask[1:seq_len + 1]):  # nothing to learn once truncated: skip
                self.examples.append((ids, mask))
        if not self.examples:
            raise NanoseekError("SFT data: no conversation has an assistant token within data.seq_len")
        self.pad_id = pad_id if pad_id is not None else (getattr(tok, "pad_token_id", None) or 0)
        self.seq_len, self.rows, self.rank, self.world, self.seed = seq_len, rows_per_rank, rank, world_size, seed
        self.epoch, self.cursor = 0, 0

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next_batch(self):
        picked = []
        order = self._order()
        for _ in range(self.rows * self.world):
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            picked.append(self.examples[order[self.cursor]])
            self.cursor += 1
        batch = sft_collate(picked, self.pad_id, self.seq_len)
        sl = slice(self.rank * self.rows, (self.rank + 1) * self.rows)
        return batch["input_ids"][sl], batch["targets"][sl]

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "n": len(self.examples)}

    def load_state_dict(self, state):
        if state["n"] != len(self.examples):
            raise NanoseekError(f"SFT data changed since the checkpoint ({state['n']} conversations then, {len(self.examples)} now)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def eval_batches(cfg, tok, n_batches: int, rank=0, world_size=1) -> list:
    """A fixed list of eval batches (the same at every eval), or [] when no eval data is set."""
    d = cfg.data
    if d.mode == "pretrain" and d.eval_shards:
        stream = PretrainStream(d.eval_shards, d.seq_len, d.batch_size, rank, world_size, seed=12345,
                                buffer_size=d.buffer_size, epochs=1)
    elif d.mode == "sft" and d.eval_file:
        stream = SFTStream(read_conversations(d.eval_file), tok, d.seq_len, d.batch_size, rank, world_size, seed=12345)
    else:
        return []
    out = []
    for _ in range(n_batches):
        b = stream.next_batch()
        if b is None:
            break
        out.append(b)
    return out


__all__ = ["IGNORE_INDEX", "PretrainStream", "SFTStream", "eval_batches", "problem_chat", "read_conversations"]
