"""BlockManager: which KV blocks are free, in use or cached, and handing them out and back.

Pure bookkeeping over block ids and block hashes (no tensors, no requests): the scheduler asks
`can_allocate`, `allocate`s, and `free`s a request's block table when it finishes, is aborted or is
preempted.

Prefix caching follows vLLM v1. A full block is named by a hash chained over the hash of the block
before it, so one hash stands for every token up to the block's end; the chain starts from a root
that names what else decides the K/V (the adapter and its scale: two adapters never share a block)
and the request's cache salt (the API salts with the account: a tenant who could hit another's
cached prefix would learn from the time to first token, or the cached-token count, what it sent).
Blocks are ref-counted: requests with the same prefix share the blocks it fills. A block whose last
user lets go stays cached, queued among the free blocks; allocation takes the least recently freed
block first and only then forgets (evicts) the hash it held. Hashes are SHA-256: a tenant who could
forge a collision with another's prefix would read that tenant's K/V, so a fast 64-bit hash will not do.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes


def prefix_root(adapter_id: str | None, lora_scale: float, cache_salt: str | None = None) -> BlockHash:
    """Where a request's hash chain starts: everything besides the tokens that decides its K/V, and the
    salt that says who may share it. repr of a tuple of str / None / float is unambiguous and exact."""
    key = (cache_salt, adapter_id, None if adapter_id is None else float(lora_scale))
    return hashlib.sha256(repr(key).encode()).digest()


def block_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The hash of a full block: its tokens, chained onto the hash of everything before them."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise the KV memory budget")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # refs 0; next out first
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they are evicted when needed)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that hold a named prefix, in use or not."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        if num > len(self._free):
            raise RuntimeError(f"asked for {num} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(num):
            b, _ = self._free.popitem(last=False)
            if b in self._hash_of:
                del self._block_of[self._hash_of.pop(b)]
                self.evictions += 1
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        # The last blocks of a sequence go first into the queue, so they are evicted before its earlier
        # blocks: a later block is only useful to a request that also hits every block before it.
        for b in reversed(blocks):
            if self._refs[b] < 1:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            self._refs[b] -= 1
            if not self._refs[b]:
                self._free[b] = None

    def cached_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first; nothing changes."""
        blocks = []
        for h in hashes if self.enable_caching else ():
            b = self._block_of.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (from `cached_prefix`) for one more request."""
        for b in blocks:
            if b not in self._hash_of:
                raise RuntimeError(f"KV block {b} is not cached")
            if not self._refs[b]:
                del self._free[b]
            self._refs[b] += 1

    def cache(self, block: int, h: BlockHash) -> None:
        """Name a held block whose K/V are all computed. A prefix already cached under another block (two
        requests computed it at once) keeps its block; this one stays unnamed and is freed as usual."""
        if self._refs[block] < 1:
            raise RuntimeError(f"KV block {block} is not held")
        if block in self._hash_of and self._hash_of[block] != h:
            raise RuntimeError(f"KV block {block} is already cached under another prefix")
        if not self.enable_caching or h in self._block_of:
            return
        self._hash_of[block] = h
        self._block_of[h] = block
