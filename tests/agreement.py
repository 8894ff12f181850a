"""How tests compare two computations of the same thing done in different shapes (a batch and one row,
chunks and one piece, kernels and the reference): never bit for bit. CPU BLAS picks its kernels by
shape and by ISA (AVX-512, AVX2, SSE), so such results agree to rounding only, and greedy tokens agree
except where two candidates tie to within that rounding.
"""
from __future__ import annotations

import torch


def assert_close_across_shapes(got: torch.Tensor, want: torch.Tensor, ulps: float = 64) -> None:
    """|got - want| <= ulps * eps(dtype) * max|want|: rounding noise of the dtype at the result's scale.
    A leak between rows (padding, another request) or a missing term is orders of magnitude larger."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    scale = want.abs().max().item()
    err, tol = (got - want).abs().max().item(), ulps * torch.finfo(want.dtype).eps * scale
    assert err <= tol, f"max difference {err:.3g} > {tol:.3g} ({ulps} ulps of the largest |value| {scale:.3g})"


def assert_greedy_agrees(tokens: torch.Tensor, want_tokens: torch.Tensor, want_logits: list[torch.Tensor],
                         atol: float) -> None:
    """Two greedy runs over the same inputs (the second fed the first's tokens): wherever `tokens` differs
    from `want_tokens`, its token scores within `atol` of the best in `want_logits` of that step (a near
    tie), so the difference is rounding, not a wrong answer. tokens: [batch, steps]."""
    for step, logits in enumerate(want_logits[:tokens.shape[1]]):
        picked = logits.float().gather(-1, tokens[:, step:step + 1].to(logits.device))[:, 0]
        gap = logits.float().max(-1).values - picked
        assert (gap <= atol).all(), (f"step {step}: tokens {tokens[:, step].tolist()} vs "
                                     f"{want_tokens[:, step].tolist()} score {gap.tolist()} below the best")


def assert_same_greedy(got: list[list[dict]], want: list[list[dict]], gap: float) -> None:
    """Per request, the per-token logprobs (`{"token_id", "top": [(id, logprob), ...]}`, logprobs >= 2) of two
    greedy runs: the same tokens, except that from a step where `want`'s two best tokens were within `gap`
    of each other (a near tie rounding may break either way) the runs may part; nothing after is compared."""
    assert len(got) == len(want)
    for r, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), f"request {r}: {len(g)} tokens, expected {len(w)}"
        for step, (a, b) in enumerate(zip(g, w)):
            if a["token_id"] != b["token_id"]:
                (_, best), (_, second) = b["top"][:2]
                assert best - second <= gap, (f"request {r} step {step}: token {a['token_id']} instead of "
                                              f"{b['token_id']}, which led by {best - second:.3g}")
                break
