"""The persistent batch (vLLM's InputBatch): a row per running request, holding on the device what its
decode steps read, so that a decode step's only host input is a few integers per row.

Per row: the sampling settings and token statistics (sampling.SamplingTable), the block table (a
mirror of the paged cache's, kept current by diffs: a decode step adds at most one block per row),
and the family's decode constants (FamilyRuntime.decode_inputs: media summaries, rope deltas). A
request takes a row when it starts running and gives it back when it finishes or is preempted.
The last row is the null row that padded (CUDA-graph bucket) rows read: its block table points at
the cache's reserved null block.

A decode step's host data - each row's index, position, min_tokens flag and block-table diff - is
written into one pinned buffer and copied to the device without blocking (`stage`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..families.runtime import FamilyRuntime
from ..paged_cache import PagedKVCache
from ..sampling import SamplingTable

# Rows of the staging buffer, one column per batch row: the row index, its token's position, whether
# it is still short of min_tokens, and (row, column, block) of a block-table entry to write.
ROWS, POSITIONS, BELOW_MIN, DIFF_ROW, DIFF_COL, DIFF_BLOCK = range(6)


class PersistentBatch:
    def __init__(self, runtime: FamilyRuntime, cache: PagedKVCache, capacity: int, max_model_len: int,
                 eos_token_ids=()):
        dev, self.cache, self.capacity = cache.device, cache, capacity
        self.null_row = capacity
        num_rows = capacity + 1
        self.sampling = SamplingTable(num_rows, runtime.lm_head.out_features, dev, eos_token_ids,
                                      runtime.never_sample)
        self.inputs = runtime.decode_inputs(num_rows)
        self.width = -(-max_model_len // cache.block_size)
        self.block_tables = torch.zeros(num_rows, self.width, dtype=torch.int32, device=dev)
        self._mirrored = [0] * num_rows      # blocks of each row already in block_tables
        self._free_rows = list(range(capacity - 1, -1, -1))
        self.row_of: dict[str, int] = {}
        pin = dev.type == "cuda"
        self._stage = torch.zeros(6, capacity, dtype=torch.int64, pin_memory=pin)
        self._stage_np: np.ndarray = self._stage.numpy()
        self.staged = torch.zeros(6, capacity, dtype=torch.int64, device=dev)

    # ---- rows ---------------------------------------------------------------------------------------
    def add(self, req) -> int:
        """Give an admitted request a row (a resumed one gets its outputs' counts and last token back)."""
        if req.request_id in self.row_of:
            return self.row_of[req.request_id]
        if not self._free_rows:
            raise RuntimeError(f"the persistent batch is full ({self.capacity} rows)")
        row = self._free_rows.pop()
        self.row_of[req.request_id] = row
        self.sampling.set_row(row, req.params, req.prompt_ids, req.output_ids)
        self.inputs.set_row(row, req)
        self._mirrored[row] = 0
        return row

    def remove(self, req) -> None:
        row = self.row_of.pop(req.request_id, None)
        if row is not None:
            self._free_rows.append(row)

    def set_null_block(self, block: int) -> None:
        self.block_tables[self.null_row] = block

    def rows(self, requests) -> list[int]:
        return [self.row_of[r.request_id] for r in requests]

    # ---- block tables ---------------------------------------------------------------------------------
    def diffs(self, requests) -> list[tuple[int, int, int]]:
        """(row, column, block) entries the device tables lack for these requests; marks them mirrored."""
        out = []
        for req in requests:
            row = self.row_of[req.request_id]
            blocks = self.cache.blocks(req.request_id)
            out += [(row, col, blocks[col]) for col in range(self._mirrored[row], len(blocks))]
            self._mirrored[row] = len(blocks)
        return out

    def sync_block_tables(self, requests) -> None:
        """Mirror new blocks eagerly (prefill and mixed steps, which may add many per row)."""
        d = self.diffs(requests)
        if d:
            r, c, b = torch.tensor(d, dtype=torch.int64).T.to(self.block_tables.device)
            self.block_tables[r, c] = b.to(torch.int32)

    # ---- a decode step's host inputs ---------------------------------------------------------------------
    def stage(self, requests, positions: list[int], below_min: list[bool], padded: int) -> torch.Tensor:
        """Stage a decode step of `requests` (one new token each, at `positions`) padded to `padded` rows,
        with its block-table diffs (at most one per row), and start the copy to the device. Returns the
        device buffer's [6, padded] view."""
        n, s = len(requests), self._stage_np
        diffs = self.diffs(requests)
        if len(diffs) > padded:
            raise RuntimeError(f"a decode step of {n} rows got {len(diffs)} new blocks")
        s[:, :padded] = 0
        s[ROWS, :padded] = self.null_row
        s[ROWS, :n] = self.rows(requests)
        s[POSITIONS, :n] = positions
        s[BELOW_MIN, :n] = below_min
        s[DIFF_ROW, :padded] = self.null_row  # padding rewrites the null row's own first entry
        s[DIFF_BLOCK, :padded] = self.cache.null_block or 0
        for i, (row, col, block) in enumerate(diffs):
            s[DIFF_ROW, i], s[DIFF_COL, i], s[DIFF_BLOCK, i] = row, col, block
        self.staged.copy_(self._stage, non_blocking=True)  # all of it: one small contiguous copy
        return self.staged[:, :padded]
