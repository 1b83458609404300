"""A replica's KV blocks: a fixed number of them, shared by the running requests (pinned) and the
prefix cache (the blocks no request holds, evicted least recently used first). Pure state.

A block is either *hashed* (a full block whose identity is its chained hash, so any request whose
prompt starts with the same tokens can share it) or *private* (reserved by one request for what it
has not computed yet). Private blocks become hashed when their tokens are computed (``publish``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError("capacity_blocks must be positive")
        self.capacity = capacity_blocks
        self._pinned: dict[bytes, int] = {}  # hashed blocks in use, by how many requests
        self._free: OrderedDict[bytes, None] = OrderedDict()  # cached, unused; LRU first
        self._private = 0

    @property
    def used(self) -> int:
        """Blocks held by running requests (what vLLM reports as KV-cache usage)."""
        return len(self._pinned) + self._private

    @property
    def cached(self) -> int:
        """Blocks with a hash, in use or not: what a prompt can hit."""
        return len(self._pinned) + len(self._free)

    def __contains__(self, block: bytes) -> bool:
        return block in self._pinned or block in self._free

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of a chain are cached (the chain breaks at the first miss)."""
        for count, block in enumerate(hashes):
            if block not in self:
                return count
        return len(hashes)

    def acquire(self, hits: Sequence[bytes], fresh: int) -> bool:
        """Pin the cached blocks ``hits`` and reserve ``fresh`` private blocks, evicting the least
        recently used free blocks to make room; False (and nothing changed) if they do not fit."""
        reused = sum(block in self._free for block in hits)
        room = self.capacity - self.used - len(self._free)
        if fresh > room + len(self._free) - reused:
            return False
        for block in hits:
            self._pin(block)
        for _ in range(fresh - room):
            self._free.popitem(last=False)
        self._private += fresh
        return True

    def publish(self, hashes: Sequence[bytes]) -> None:
        """Private blocks whose tokens are now computed become the hashed blocks ``hashes``. One
        computed meanwhile by another request is shared, and the private copy freed."""
        for block in hashes:
            self._private -= 1
            self._pin(block)

    def release(self, hashes: Sequence[bytes], private: int) -> None:
        """A request ends: its private blocks are freed, its hashed ones unpinned. The tail of a
        chain goes to the eviction end first (as vLLM frees blocks in reverse), so a chain is
        evicted from its end and its head, the part other prompts share, stays longest."""
        self._private -= private
        for block in reversed(hashes):
            count = self._pinned[block] - 1
            if count:
                self._pinned[block] = count
            else:
                del self._pinned[block]
                self._free[block] = None

    def _pin(self, block: bytes) -> None:
        if block in self._free:
            del self._free[block]
        self._pinned[block] = self._pinned.get(block, 0) + 1
