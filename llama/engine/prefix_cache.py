"""Keys and values of earlier prompts, kept for the requests that start the same way.

A chat client sends the whole conversation every turn: without this, the server prefills all
of it again. Here a prompt's tokens are cut into blocks of `block_size`; a block is named by
a hash of its tokens chained with the name of the block before it, so a name stands for the
whole prefix up to the block's end (keys and values depend on every token before them, and
on the positions, which here always start at slot 0). When a request joins the batch, the
engine copies the longest run of known blocks that begins its prompt into its cache row and
prefills only the rest; when a prompt is prefilled, and when the request leaves, its blocks
(the answer's included) are kept. At most `capacity` blocks are held; the least recently
used go first, a prefix's later blocks before its earlier ones.

Under torchrun every rank holds the keys and values of its own heads, and every rank makes
the same calls in the same order with the same tokens (the scheduler applies rank 0's
decisions everywhere), so every rank finds and evicts the same blocks.
"""

import hashlib
from array import array
from collections import OrderedDict
from typing import Dict, List

import torch

from llama.layers.cache import KVCache

BLOCK_SIZE = 16


class PrefixCacheError(ValueError):
    """A prefix cache that cannot be built as asked."""


class PrefixCache:
    """Blocks of keys and values, each (2, n_layers, n_kv_heads, block_size, head_dim)."""

    def __init__(self, capacity: int, block_size: int = BLOCK_SIZE):
        if not isinstance(capacity, int) or capacity < 1:
            raise PrefixCacheError(f"a prefix cache holds at least one block, got capacity "
                                   f"{capacity!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise PrefixCacheError(f"block_size must be an int >= 1, got {block_size!r}")
        self.capacity, self.block_size = capacity, block_size
        self.blocks: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()  # oldest use first
        self.hits = 0  # requests that found at least one block
        self.misses = 0  # requests that found none
        self.hit_tokens = 0  # prompt tokens copied from blocks
        self.prefilled_tokens = 0  # prompt tokens left to prefill

    @classmethod
    def with_megabytes(cls, megabytes: float, cache: KVCache,
                       block_size: int = BLOCK_SIZE) -> "PrefixCache":
        """As many blocks as `megabytes` MiB hold, for blocks of `cache`'s layout (per rank)."""
        per_block = cache.nbytes // (cache.rows * cache.length) * block_size
        capacity = int(megabytes * 2 ** 20) // per_block
        if capacity < 1:
            raise PrefixCacheError(
                f"a prefix cache of {megabytes} MiB cannot hold one block of {block_size} "
                f"tokens ({per_block / 2 ** 20:.3f} MiB for this model): give at least that, "
                f"or 0 to turn it off")
        return cls(capacity, block_size)

    def keys(self, tokens: List[int]) -> List[bytes]:
        """The names of the full blocks of `tokens`, in order."""
        names, name = [], b""
        for begin in range(0, len(tokens) - self.block_size + 1, self.block_size):
            block = array("q", tokens[begin: begin + self.block_size]).tobytes()
            name = hashlib.blake2b(name + block, digest_size=16).digest()
            names.append(name)
        return names

    def load(self, prompt: List[int], cache: KVCache, row: int) -> int:
        """Copy the known blocks that begin `prompt` into slots 0.. of cache row `row`.
        Returns the prompt tokens copied: whole blocks, short of the prompt's last token,
        which the model must still run on for the first logits."""
        names = self.keys(prompt[:-1])
        found = []
        for name in names:
            if name not in self.blocks:
                break
            found.append(name)
        count = len(found) * self.block_size
        if found:
            kv = torch.cat([self.blocks[name] for name in found], dim=3)  # (2, L, kv, count, hd)
            for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
                k[row, :, :count] = kv[0, layer]
                v[row, :, :count] = kv[1, layer]
            self._touch(found)
        self.hits += bool(found)
        self.misses += not found
        self.hit_tokens += count
        self.prefilled_tokens += len(prompt) - count
        return count

    def store(self, tokens: List[int], cache: KVCache, row: int) -> None:
        """Keep the full blocks of `tokens`, whose keys and values are in slots 0.. of cache
        row `row`; those already kept count as used."""
        names = self.keys(tokens)
        missing = [i for i, name in enumerate(names) if name not in self.blocks]
        if missing:
            size = self.block_size
            begin, end = missing[0] * size, (missing[-1] + 1) * size
            # (2, n_layers, n_kv_heads, end - begin, head_dim): one copy per layer
            kv = torch.stack([torch.stack([t[row, :, begin:end] for t in cache.k]),
                              torch.stack([t[row, :, begin:end] for t in cache.v])])
            for i in missing:
                offset = i * size - begin
                self.blocks[names[i]] = kv[:, :, :, offset: offset + size].clone()
        self._touch(names)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def _touch(self, names: List[bytes]) -> None:
        # Latest first, so that a prefix's first blocks are the most recently used: eviction
        # takes a prefix from its end, and what remains is still found.
        for name in reversed(names):
            self.blocks.move_to_end(name)

    def stats(self) -> Dict[str, int]:
        """What /health reports."""
        return {"blocks": len(self.blocks), "capacity_blocks": self.capacity,
                "block_size": self.block_size, "hits": self.hits, "misses": self.misses,
                "hit_tokens": self.hit_tokens, "prefilled_tokens": self.prefilled_tokens}
