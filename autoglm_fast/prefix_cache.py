"""Content hashes of KV-cache blocks, for automatic prefix caching (vLLM's scheme).

A full block's hash chains its parent block's hash, its token ids and the digests of the media
items that begin inside it, so two sequences whose blocks hash alike hold the same K/V there: a
later request reuses the blocks of an earlier one's prefix instead of prefilling them again.
Placeholder tokens say nothing about the picture behind them; the media digest (the preprocessed
pixels or features, with their shapes) is what tells two screenshots apart. Which media a block's
K/V depends on is the family's to say (FamilyRuntime.cache_keys); here it is only hashed.
"""
from __future__ import annotations

import hashlib
from array import array

import torch

MediaKeys = list[tuple[int, bytes]]  # (first token position the media affects, its digest)


def tensor_digest(*tensors: torch.Tensor) -> bytes:
    """A digest of tensors' dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def media_digest(media: dict) -> bytes | None:
    """One digest of every tensor in a request's preprocessed media (None without media)."""
    tensors = [v for _, v in sorted(media.items()) if isinstance(v, torch.Tensor)]
    extra = [torch.as_tensor(v) for _, v in sorted(media.items()) if not isinstance(v, torch.Tensor)]
    return tensor_digest(*tensors, *extra) if tensors or extra else None


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int,
                        media_keys: MediaKeys = ()) -> None:
    """Append the hashes of the full blocks of `token_ids` that `hashes` does not cover yet."""
    for i in range(len(hashes), len(token_ids) // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        h = hashlib.blake2b(hashes[-1] if hashes else b"root", digest_size=16)
        h.update(array("q", token_ids[lo:hi]).tobytes())
        for start, digest in media_keys:
            if lo <= start < hi:
                h.update(digest)
        hashes.append(h.digest())
