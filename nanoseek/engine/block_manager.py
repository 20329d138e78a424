"""KV block allocation with automatic prefix caching.

The KV cache is a pool of fixed-size blocks; each sequence owns a block table (list of block
ids). A block that is full of computed tokens is registered under a hash of (parent block's
hash, its token ids), so a later sequence with the same prefix (system prompt, few-shot
header, n>1 samples) takes the block instead of recomputing it. Blocks nobody references
stay cached until the space is needed, evicted least-recently-used first.
"""

from collections import OrderedDict


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free = list(range(num_blocks - 1, -1, -1))   # never-used or evicted blocks (stack)
        self.refs = [0] * num_blocks
        self.hash_of = [None] * num_blocks                # block -> hash while its content is cached
        self.cached = {}                                  # hash -> block
        self.evictable = OrderedDict()                    # ref-0 cached blocks, LRU first
        self.hit_tokens = self.query_tokens = 0

    # ---- capacity -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, table: list[int], total_tokens: int) -> int:
        return max(0, -(-total_tokens // self.block_size) - len(table))

    # ---- allocation ---------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.evictable.popitem(last=False)  # least recently used cached block
            del self.cached[self.hash_of[b]]
            self.hash_of[b] = None
        self.refs[b] = 1
        return b

    def allocate(self, table: list[int], total_tokens: int) -> bool:
        """Grow `table` to hold total_tokens; False (and nothing taken) if the pool is short."""
        need = self.blocks_needed(table, total_tokens)
        if need > self.num_free:
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def release(self, table: list[int]):
        for b in reversed(table):  # reversed: a prefix's tail is evicted before its head
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free.append(b)
        table.clear()

    # ---- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, tokens: list[int], table: list[int]) -> tuple[int, list[int]]:
        """Take cached blocks for the longest cached prefix of tokens.

        At least one token is always left to compute (its logits start generation), so a
        fully cached prompt reuses all but its last block. Returns (tokens covered, hashes).
        """
        hashes, parent = [], None
        if not self.enable_prefix_caching:
            return 0, hashes
        bs = self.block_size
        usable = (len(tokens) - 1) // bs
        for i in range(usable):
            h = block_hash(parent, tuple(tokens[i * bs:(i + 1) * bs]))
            b = self.cached.get(h)
            if b is None:
                break
            if self.refs[b] == 0:
                self.evictable.pop(b)
            self.refs[b] += 1
            table.append(b)
            hashes.append(h)
            parent = h
        self.query_tokens += len(tokens)
        self.hit_tokens += len(hashes) * bs
        return len(hashes) * bs, hashes

    def register_full_blocks(self, tokens: list[int], table: list[int], hashes: list[int], num_computed: int):
        """Publish blocks that became full of computed tokens (hashes grows as a side effect)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while len(hashes) < num_computed // bs:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else None, tuple(tokens[i * bs:(i + 1) * bs]))
            hashes.append(h)
            b = table[i]
            if h not in self.cached and self.hash_of[b] is None:
                self.cached[h] = b
                self.hash_of[b] = h

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (their KV came from weights that have since changed);
        False, and nothing changed, while any block is still held by a sequence."""
        if any(self.refs):
            return False
        self.free.extend(reversed(self.evictable))  # popped from the end: LRU order kept
        self.evictable.clear()
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
        return True

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
