"""An approximate index of what each replica's prefix cache holds, fed by what the gateway sent.

A prompt is cut into blocks of ``block_chars`` characters, each named by a hash chained over
every block before it (as vLLM names its KV blocks: a block is only reusable after the same
prefix), so a request's match on a replica is the number of leading blocks the replica was
sent before. Each replica keeps at most ``capacity`` blocks, least recently used out first, as
its KV cache would; its real cache may hold less (other gateways, eviction under memory
pressure), hence "approximate": a wrong guess costs a prefill, never a wrong answer.

Pure state, no I/O, no clock. One dict maps a block to the bit mask of the replicas holding it,
so matching a prompt against every replica is one walk down its blocks, whatever their number.
Python's ``hash`` is salted per process, which is fine: the index lives and dies with it.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self, replicas: int, block_chars: int, capacity: int, max_blocks: int) -> None:
        self._block_chars = block_chars
        self._capacity = capacity
        self._max_blocks = max_blocks  # a longer prompt is indexed by its first blocks only
        self._holders: dict[int, int] = {}  # block → bit mask of the replicas holding it
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]

    def blocks(self, text: str) -> list[int]:
        """The chained block names of a prompt's whole blocks (a partial last block is not
        cached by an engine either)."""
        size = self._block_chars
        whole = min(len(text) // size, self._max_blocks)
        chain: list[int] = []
        previous = 0
        for start in range(0, whole * size, size):
            previous = hash((previous, text[start : start + size]))
            chain.append(previous)
        return chain

    def matches(self, chain: list[int]) -> list[int]:
        """For each replica, how many leading blocks of ``chain`` it holds."""
        found = [0] * len(self._lru)
        mask = (1 << len(self._lru)) - 1
        holders = self._holders
        for depth, block in enumerate(chain):
            still = holders.get(block, 0) & mask
            if still != mask:
                for replica in _bits(mask & ~still):
                    found[replica] = depth
                mask = still
                if not mask:
                    return found
        for replica in _bits(mask):
            found[replica] = len(chain)
        return found

    def insert(self, replica: int, chain: list[int]) -> None:
        """``replica`` was sent this prompt: it holds its blocks now, the most recent ones."""
        lru = self._lru[replica]
        bit = 1 << replica
        holders = self._holders
        for block in chain:
            if block in lru:
                lru.move_to_end(block)
                continue
            lru[block] = None
            holders[block] = holders.get(block, 0) | bit
        while len(lru) > self._capacity:
            old, _ = lru.popitem(last=False)
            self._drop(old, bit)

    def forget(self, replica: int) -> None:
        """The replica's cache is gone (it restarted, or left): nothing is assumed of it."""
        bit = 1 << replica
        for block in self._lru[replica]:
            self._drop(block, bit)
        self._lru[replica].clear()

    def size(self, replica: int) -> int:
        return len(self._lru[replica])

    def _drop(self, block: int, bit: int) -> None:
        left = self._holders.get(block, 0) & ~bit
        if left:
            self._holders[block] = left
        else:
            self._holders.pop(block, None)


def _bits(mask: int) -> list[int]:
    found = []
    index = 0
    while mask:
        if mask & 1:
            found.append(index)
        mask >>= 1
        index += 1
    return found
