"""Paged KV cache (vLLM-style): per layer a pool of fixed-size blocks for K and for V, and per
sequence a block table. The cache owns allocation and freeing; kernels read and write the pools in
place through the block tables (never a copy or `.contiguous()` of a pool).

Pool layout per layer: [num_blocks, block_size, num_kv_heads, head_dim].

Block size defaults to 32 tokens: a power of two, so `pos // block_size` and `pos % block_size`
are a shift and a mask in the kernels; a 64-token attention tile spans exactly two pages; a page of
one layer's K is 32 x 2 heads x 128 x 2 B = 16 KB, large enough that each tile load is a few long
contiguous runs; and the waste is under one page (< 32 tokens) per sequence - 0.1 % at 32k context.
"""
from __future__ import annotations

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

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token: the split-K decode kernel applies."""
        return self.max_query_len == 1


class PagedKVCache:
    def __init__(self, config: TextConfig, num_blocks: int, block_size: int = 32,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu", with_pools: bool = True):
        """with_pools=False: only the block accounting (the eager backend keeps its own caches but
        schedules exactly like the fast one)."""
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.config, self.block_size, self.num_blocks = config, block_size, num_blocks
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim) if with_pools else (0,)
        self.device = torch.device(device)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self._blocks: dict[object, list[int]] = {}
        self._lens: dict[object, int] = {}
        self.null_block: int | None = None

    @classmethod
    def for_memory(cls, config: TextConfig, bytes_budget: int, block_size: int = 32,
                   dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> "PagedKVCache":
        per_block = config.kv_cache_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size
        return cls(config, max(1, bytes_budget // per_block), block_size, dtype, device)

    # ---- allocation ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks sequences can use (all but the reserved null block, if any)."""
        return self.num_blocks - (self.null_block is not None)

    def reserve_null_block(self) -> int:
        """Take one block out of circulation for padding rows to write to (CUDA-graph buckets)."""
        if self.null_block is None:
            if not self._free:
                raise RuntimeError("KV cache has no free block to reserve as the null block")
            self.null_block = self._free.pop()
        return self.null_block

    def blocks_needed(self, seq_id, num_new_tokens: int) -> int:
        total = self._lens.get(seq_id, 0) + num_new_tokens
        return max(0, -(-total // self.block_size) - len(self._blocks.get(seq_id, ())))

    def can_append(self, seq_ids, num_new_tokens) -> bool:
        return sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, num_new_tokens)) <= self.num_free_blocks

    def seq_len(self, seq_id) -> int:
        return self._lens.get(seq_id, 0)

    def free(self, seq_id) -> None:
        """Return a finished or aborted sequence's blocks to the pool (unknown ids are ignored)."""
        self._free.extend(reversed(self._blocks.pop(seq_id, [])))
        self._lens.pop(seq_id, None)

    def _reserve(self, seq_id, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq_id, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: sequence {seq_id!r} needs {need} more, "
                               f"{len(self._free)} free of {self.num_blocks}")
        blocks = self._blocks.setdefault(seq_id, [])
        blocks.extend(self._free.pop() for _ in range(need))

    # ---- one step -------------------------------------------------------------------------------
    def step(self, seq_ids: list, num_new_tokens: list[int]) -> PagedAttentionMetadata:
        """Reserve pages for `num_new_tokens[i]` more tokens of each sequence (new ids start empty)
        and describe the step for the kernels. All-or-nothing: out of blocks raises before anything
        changes. Token rows are laid out sequence after sequence, in the order given."""
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
        bs = self.block_size
        tables = [self._blocks[s] for s in seq_ids]
        width = max(len(t) for t in tables)
        positions = [p for start, n in zip(starts, num_new_tokens) for p in range(start, start + n)]
        slots = [tables[i][p // bs] * bs + p % bs
                 for i, (start, n) in enumerate(zip(starts, num_new_tokens)) for p in range(start, start + n)]
        loc = [0]
        for n in num_new_tokens:
            loc.append(loc[-1] + n)
        dev = self.device
        as_t = lambda x, dt: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
        return PagedAttentionMetadata(
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
