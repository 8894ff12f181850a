"""Paged KV cache (vLLM-style): per layer a pool of fixed-size blocks for K and for V, and per
sequence a block table. The cache owns allocation and freeing; kernels read and write the pools in
place through the block tables (never a copy or `.contiguous()` of a pool).

With prefix caching, blocks are reference-counted: a full block is registered under its content
hash (prefix_cache.py) once its K/V is written, a new sequence starts on the cached blocks of its
prefix, and a block nobody holds stays cached until it is handed out again (least recently freed
first), so preemption and aborts never free what another sequence still reads.

Pool layout per layer: [num_blocks, block_size, num_kv_heads, head_dim].

Block size defaults to 32 tokens: a power of two, so `pos // block_size` and `pos % block_size`
are a shift and a mask in the kernels; a 64-token attention tile spans exactly two pages; a page of
one layer's K is 32 x 2 heads x 128 x 2 B = 16 KB, large enough that each tile load is a few long
contiguous runs; and the waste is under one page (< 32 tokens) per sequence - 0.1 % at 32k context.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .config import TextConfig


@dataclass
class PagedAttentionMetadata:
    """What one forward step's attention needs: which sequences, where their new tokens sit, where
    their pages are. Token rows are the flattened [batch * new tokens] rows of the step's input."""
    block_tables: torch.Tensor     # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor         # int32 [num_seqs] context length after this step (cached + new)
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1] first token row of each sequence (cu_seqlens)
    positions: torch.Tensor        # int64 [num_tokens] position of each new token
    slot_mapping: torch.Tensor     # int64 [num_tokens] block * block_size + offset where its K/V go
    max_query_len: int
    max_seq_len: int
    # M-RoPE (GLM-4.1V): int64 [3, num_tokens] (t, h, w) rotary positions, set by the engine; None: the
    # rotary embedding uses `positions`
    rope_positions: torch.Tensor | None = None
    # A mixed step: its first num_decodes sequences add one token each (decode attention reads them),
    # the rest are prefill chunks, whose cu_seqlens from 0 are prefill_query_start_loc
    num_decodes: int = 0
    prefill_query_start_loc: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token: the split-K decode kernel applies."""
        return self.max_query_len == 1


class PagedKVCache:
    def __init__(self, config: TextConfig, num_blocks: int, block_size: int = 32,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu", with_pools: bool = True,
                 enable_prefix_caching: bool = False):
        """with_pools=False: only the block accounting (the eager backend keeps its own caches but
        schedules exactly like the fast one). enable_prefix_caching: full blocks are kept, by content
        hash, after their sequence is freed, for later sequences with the same prefix (prefix_cache.py)."""
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.config, self.block_size, self.num_blocks = config, block_size, num_blocks
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim) if with_pools else (0,)
        self.device = torch.device(device)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.prefix_caching = enable_prefix_caching
        # Unreferenced blocks, in eviction order (the front goes first). A block whose content is
        # cached stays findable by its hash until it is handed out again.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}      # block -> the content hash it is cached under
        self._by_hash: dict[bytes, int] = {}      # content hash -> block
        self._blocks: dict[object, list[int]] = {}
        self._lens: dict[object, int] = {}
        self._committed: dict[object, int] = {}   # full blocks of a sequence already offered to the cache
        self.null_block: int | None = None
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found (the hit rate)
        self.evictions = 0  # cached blocks handed out again

    @classmethod
    def for_memory(cls, config: TextConfig, bytes_budget: int, block_size: int = 32,
                   dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> "PagedKVCache":
        per_block = config.kv_cache_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size
        return cls(config, max(1, bytes_budget // per_block), block_size, dtype, device)

    # ---- allocation ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get: never used, freed, or cached but unreferenced (evicted on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    @property
    def capacity(self) -> int:
        """Blocks sequences can use (all but the reserved null block, if any)."""
        return self.num_blocks - (self.null_block is not None)

    def reserve_null_block(self) -> int:
        """Take one block out of circulation for padding rows to write to (CUDA-graph buckets)."""
        if self.null_block is None:
            if not self._free:
                raise RuntimeError("KV cache has no free block to reserve as the null block")
            self.null_block = self._take_free()
        return self.null_block

    def blocks_needed(self, seq_id, num_new_tokens: int, cached: list[int] = ()) -> int:
        """Free blocks `num_new_tokens` more tokens of a sequence take; for a new one starting on
        `cached` blocks (find_cached), those of them no running sequence holds count too."""
        if cached:
            total, have = len(cached) * self.block_size + num_new_tokens, len(cached)
            return max(0, -(-total // self.block_size) - have) + sum(self._refs[b] == 0 for b in cached)
        total = self._lens.get(seq_id, 0) + num_new_tokens
        return max(0, -(-total // self.block_size) - len(self._blocks.get(seq_id, ())))

    def can_append(self, seq_ids, num_new_tokens) -> bool:
        return sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, num_new_tokens)) <= self.num_free_blocks

    def seq_len(self, seq_id) -> int:
        return self._lens.get(seq_id, 0)

    def free(self, seq_id) -> None:
        """Drop a finished, aborted or preempted sequence's hold on its blocks (unknown ids are ignored).
        A block nobody else holds becomes free; if its content is cached it is evicted last, and a
        sequence's later blocks before its earlier ones (they are less likely to be shared)."""
        for block in reversed(self._blocks.pop(seq_id, [])):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:  # nothing to keep: reuse it first
                    self._free.move_to_end(block, last=False)
        self._lens.pop(seq_id, None)
        self._committed.pop(seq_id, None)

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        if block in self._hash_of:  # evict: its content is about to be overwritten
            del self._by_hash[self._hash_of.pop(block)]
            self.evictions += 1
        self._refs[block] = 1
        return block

    def _reserve(self, seq_id, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq_id, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: sequence {seq_id!r} needs {need} more, "
                               f"{len(self._free)} free of {self.num_blocks}")
        blocks = self._blocks.setdefault(seq_id, [])
        blocks.extend(self._take_free() for _ in range(need))

    # ---- prefix caching -----------------------------------------------------------------------
    def find_cached(self, block_hashes: list[bytes], num_tokens: int) -> list[int]:
        """Blocks holding the longest cached prefix of a new sequence of `num_tokens` tokens whose full
        blocks hash to `block_hashes`. At least one token is left to compute (its logits start decoding)."""
        if not self.prefix_caching:
            return []
        hits = []
        for h in block_hashes[:(num_tokens - 1) // self.block_size]:
            block = self._by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def share(self, seq_id, cached: list[int], num_tokens: int) -> None:
        """Start a new sequence on the cached blocks of its prefix (from find_cached); counts the lookup
        of its `num_tokens` prompt tokens towards the hit rate."""
        if seq_id in self._blocks:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        for block in cached:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        if cached:
            self._blocks[seq_id] = list(cached)
            self._lens[seq_id] = len(cached) * self.block_size
            self._committed[seq_id] = len(cached)
        self.prefix_queries += num_tokens
        self.prefix_hits += len(cached) * self.block_size

    def commit(self, seq_id, block_hashes: list[bytes]) -> None:
        """Offer a sequence's newly filled blocks (their K/V written) to the cache under their hashes.
        A hash already cached keeps its block: this sequence's copy is an ordinary private block."""
        if not self.prefix_caching:
            return
        blocks, done = self._blocks.get(seq_id, []), self._committed.get(seq_id, 0)
        full = min(len(block_hashes), self._lens.get(seq_id, 0) // self.block_size)
        for i in range(done, full):
            if block_hashes[i] not in self._by_hash and blocks[i] not in self._hash_of:
                self._by_hash[block_hashes[i]] = blocks[i]
                self._hash_of[blocks[i]] = block_hashes[i]
        self._committed[seq_id] = max(done, full)

    # ---- one step -------------------------------------------------------------------------------
    def append(self, seq_ids: list, num_new_tokens: list[int]) -> list[int]:
        """Reserve pages for `num_new_tokens[i]` more tokens of each sequence (new ids start empty); returns
        where each sequence's new tokens start. Host bookkeeping only. All-or-nothing: out of blocks
        raises before anything changes."""
        if len(seq_ids) != len(num_new_tokens) or not seq_ids:
            raise ValueError("step needs one num_new_tokens entry per sequence, and at least one sequence")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("step got the same sequence twice")
        if any(n < 1 for n in num_new_tokens):
            raise ValueError(f"num_new_tokens must all be >= 1, got {num_new_tokens}")
        if not self.can_append(seq_ids, num_new_tokens):
            need = sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, num_new_tokens))
            raise RuntimeError(f"KV cache out of blocks: the step needs {need}, {self.num_free_blocks} free")
        starts = [self.seq_len(s) for s in seq_ids]
        for s, n in zip(seq_ids, num_new_tokens):
            self._reserve(s, n)
            self._lens[s] = self._lens.get(s, 0) + n
        return starts

    def blocks(self, seq_id) -> list[int]:
        """A sequence's block table (the cache's own list: read, never modify)."""
        return self._blocks.get(seq_id, [])

    def step(self, seq_ids: list, num_new_tokens: list[int]) -> PagedAttentionMetadata:
        """`append`, then describe the step for the kernels. Token rows are laid out sequence after
        sequence, in the order given; decode rows (one new token) should come first (`num_decodes`)."""
        starts = self.append(seq_ids, num_new_tokens)
        bs = self.block_size
        tables = [self._blocks[s] for s in seq_ids]
        width = max(len(t) for t in tables)
        positions = [p for start, n in zip(starts, num_new_tokens) for p in range(start, start + n)]
        slots = [tables[i][p // bs] * bs + p % bs
                 for i, (start, n) in enumerate(zip(starts, num_new_tokens)) for p in range(start, start + n)]
        loc = [0]
        for n in num_new_tokens:
            loc.append(loc[-1] + n)
        num_decodes = next((i for i, n in enumerate(num_new_tokens) if n != 1), len(num_new_tokens))
        dev = self.device
        as_t = lambda x, dt: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
        mixed = 0 < num_decodes < len(seq_ids)
        return PagedAttentionMetadata(
            num_decodes=num_decodes,
            prefill_query_start_loc=as_t([x - num_decodes for x in loc[num_decodes:]], torch.int32) if mixed else None,
            block_tables=as_t([t + [0] * (width - len(t)) for t in tables], torch.int32),
            seq_lens=as_t([self._lens[s] for s in seq_ids], torch.int32),
            query_start_loc=as_t(loc, torch.int32), positions=as_t(positions, torch.int64),
            slot_mapping=as_t(slots, torch.int64), max_query_len=max(num_new_tokens),
            max_seq_len=max(self._lens[s] for s in seq_ids))

    def layer_caches(self, meta: PagedAttentionMetadata) -> list["PagedLayerCache"]:
        """What to pass as the model's `caches` for this step."""
        return [PagedLayerCache(k, v, meta) for k, v in zip(self.k_pools, self.v_pools)]


@dataclass
class PagedLayerCache:
    """One layer's pools plus the step's metadata: the `cache` a FastGlmAttention receives."""
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    meta: PagedAttentionMetadata
