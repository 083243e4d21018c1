"""A block-level prefix cache that reports how many prompt tokens it could reuse.

TensorRT-LLM (with `enable_kv_cache_reuse`) keeps the KV cache of finished
requests in fixed-size token blocks and reuses the blocks a new prompt starts
with; it reports that through its KV-cache reuse statistics
(`kv_cache_reused_blocks` with `return_perf_metrics`). This engine has no KV
cache to reuse, so this class only does the bookkeeping: the same blocks,
the same "whole blocks from the start of the prompt" rule, and an LRU bound,
so the number it reports behaves like the real one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, *, block_size: int = 16, max_blocks: int = 4096):
        if block_size < 1 or max_blocks < 1:
            raise ValueError("block_size and max_blocks must be positive")
        self.block_size = block_size
        self.max_blocks = max_blocks
        # Key: a hash chained over every block up to this one. A block is only
        # reusable after the same tokens, so its key must cover the whole prefix.
        self._blocks: OrderedDict[int, None] = OrderedDict()
        # Requests run on several threads of one model instance.
        self._lock = threading.Lock()

    def _keys(self, token_ids: Sequence[int], limit: int) -> list[int]:
        keys = []
        key = 0
        for start in range(0, limit - self.block_size + 1, self.block_size):
            key = hash((key, tuple(token_ids[start : start + self.block_size])))
            keys.append(key)
        return keys

    def lookup(self, prompt_ids: Sequence[int]) -> int:
        """Prompt tokens served from the cache: whole leading blocks that are cached.

        The last prompt token is always computed (its logits give the first
        output token), so a block that would cover it never counts.
        """
        keys = self._keys(prompt_ids, max(len(prompt_ids) - 1, 0))
        hits = 0
        with self._lock:
            for key in keys:
                if key not in self._blocks:
                    break
                self._blocks.move_to_end(key)
                hits += 1
        return hits * self.block_size

    def store(self, token_ids: Sequence[int]) -> None:
        """Remember every whole block of a finished sequence (prompt and output)."""
        keys = self._keys(token_ids, len(token_ids))
        with self._lock:
            for key in keys:
                self._blocks[key] = None
                self._blocks.move_to_end(key)
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
