"""Gated three-way fusion: z = g_v*v + g_a*a + g_t*t with g = sigmoid(W_g [v; a; t] + b), per text row.

The v/a part of the gate logits, c[b] = W_g[:, :2H] [v_b; a_b] + b, is the same for every row of a
sequence: for prefill a small kernel computes it once per sequence, for decode (T == 1, every row its own
sequence) the row kernel computes it inline. The row kernel takes ROWS rows of the flattened [B*T, H] per
CTA: it loads each slice of W_g once for all of them, reads t once, does the three gates' reductions as
one [ROWS, BLOCK_H] reduction, and writes z once. Rows of a CTA may belong to different sequences, so
flags, logits and media are looked up per row. Absent modality (has_v / has_a false): vector 0 and gate 0.
Eager reference: `reference_fusion`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import as_rows, check_shape, check_tensor, compute_dtype

SUMMARY_BLOCK = 1024  # H-chunk of the summary loop
SUMMARY_WARPS = 8     # the per-sequence summary kernel: at 4 warps ptxas spills (sm_80, bf16)
ROWS = 4              # text rows per CTA: each gate-weight slice is loaded once for all of them


@triton.jit
def _gate_terms(x, w_ptr, offs, col_ok, stride_w):
    """x * W_k[offs] for the gates k = v, a, t, each weight slice loaded once and broadcast over x's rows."""
    w0 = tl.load(w_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w_ptr + stride_w + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + 2 * stride_w + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return x * w0, x * w1, x * w2


@triton.jit
def _summary_logits(w_ptr, b_ptr, v_ptr, a_ptr, has_v, has_a, seq, H, stride_w, stride_v, stride_a,
                    HAS_V: tl.constexpr, HAS_A: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """c_k = W_k[:H] . v' + W_k[H:2H] . a' + b_k for k = v, a, t and the sequences `seq` [ROWS]; v', a' are
    zero where has_v / has_a is false (masked out of the loads: an absent vector's buffer may hold garbage)."""
    acc0 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    acc1 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        col_ok = offs < H
        if HAS_V:
            v = tl.load(v_ptr + seq[:, None] * stride_v + offs[None, :], mask=has_v[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            x0, x1, x2 = _gate_terms(v, w_ptr, offs, col_ok, stride_w)
            acc0, acc1, acc2 = acc0 + x0, acc1 + x1, acc2 + x2
        if HAS_A:
            a = tl.load(a_ptr + seq[:, None] * stride_a + offs[None, :], mask=has_a[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            x0, x1, x2 = _gate_terms(a, w_ptr + H, offs, col_ok, stride_w)
            acc0, acc1, acc2 = acc0 + x0, acc1 + x1, acc2 + x2
    return (tl.sum(acc0, axis=1) + tl.load(b_ptr).to(tl.float32),
            tl.sum(acc1, axis=1) + tl.load(b_ptr + 1).to(tl.float32),
            tl.sum(acc2, axis=1) + tl.load(b_ptr + 2).to(tl.float32))


@triton.jit
def _presence(h_ptr, seq, row_ok, HAS: tl.constexpr):
    """Per-row presence flag (False for rows past the end); `row_ok` stands in when the modality is absent."""
    if HAS:
        return tl.load(h_ptr + seq, mask=row_ok, other=0) != 0
    return row_ok


@triton.jit
def fusion_summary_kernel(w_ptr, b_ptr, v_ptr, a_ptr, hv_ptr, ha_ptr, c_ptr, H, stride_w, stride_v, stride_a,
                          HAS_V: tl.constexpr, HAS_A: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0) + tl.arange(0, 1)
    ok = seq >= 0
    c0, c1, c2 = _summary_logits(w_ptr, b_ptr, v_ptr, a_ptr, _presence(hv_ptr, seq, ok, HAS_V),
                                 _presence(ha_ptr, seq, ok, HAS_A), seq, H, stride_w, stride_v, stride_a,
                                 HAS_V, HAS_A, 1, BLOCK)
    tl.store(c_ptr + seq * 3, c0)
    tl.store(c_ptr + seq * 3 + 1, c1)
    tl.store(c_ptr + seq * 3 + 2, c2)


@triton.jit
def gated_fusion_kernel(t_ptr, z_ptr, w_ptr, b_ptr, v_ptr, a_ptr, hv_ptr, ha_ptr, c_ptr, n_rows, T, H, stride_tr,
                        stride_zr, stride_w, stride_v, stride_a, HAS_V: tl.constexpr, HAS_A: tl.constexpr,
                        INLINE_SUMMARY: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                        SUMMARY: tl.constexpr):
    # ROWS consecutive rows of the flattened [B*T, H]. They may straddle sequences (at decode, T == 1, every
    # row is its own), so each row looks up its own sequence's flags, summary logits and media vectors.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    seq = rows // T
    has_v = _presence(hv_ptr, seq, row_ok, HAS_V)
    has_a = _presence(ha_ptr, seq, row_ok, HAS_A)
    if INLINE_SUMMARY:
        c0, c1, c2 = _summary_logits(w_ptr, b_ptr, v_ptr, a_ptr, has_v, has_a, seq, H, stride_w, stride_v,
                                     stride_a, HAS_V, HAS_A, ROWS, SUMMARY)
    else:
        c0 = tl.load(c_ptr + seq * 3, mask=row_ok, other=0.0)
        c1 = tl.load(c_ptr + seq * 3 + 1, mask=row_ok, other=0.0)
        c2 = tl.load(c_ptr + seq * 3 + 2, mask=row_ok, other=0.0)
    offs = tl.arange(0, BLOCK_H)
    col_ok = offs < H
    m = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    t = tl.load(t_ptr + rows[:, None] * stride_tr + offs[None, :], mask=m, other=0.0).to(tl.float32)
    x0, x1, x2 = _gate_terms(t, w_ptr + 2 * H, offs, col_ok, stride_w)
    l0, l1, l2 = tl.sum(x0, axis=1), tl.sum(x1, axis=1), tl.sum(x2, axis=1)  # each for all the rows at once
    z = tl.sigmoid(c2 + l2)[:, None] * t
    if HAS_V:  # absent rows: gate 0 and the vector masked to 0 (never 0 * garbage)
        v = tl.load(v_ptr + seq[:, None] * stride_v + offs[None, :], mask=m & has_v[:, None], other=0.0)
        z += tl.where(has_v, tl.sigmoid(c0 + l0), 0.0)[:, None] * v.to(tl.float32)
    if HAS_A:
        a = tl.load(a_ptr + seq[:, None] * stride_a + offs[None, :], mask=m & has_a[:, None], other=0.0)
        z += tl.where(has_a, tl.sigmoid(c1 + l1), 0.0)[:, None] * a.to(tl.float32)
    tl.store(z_ptr + rows[:, None] * stride_zr + offs[None, :], z.to(z_ptr.dtype.element_ty), mask=m)


def _modality(name: str, x, present, t: torch.Tensor):
    B, H = t.shape[0], t.shape[-1]
    if x is None:
        if present is not None and bool(present.any()):
            raise ValueError(f"has_{name} marks rows present but {name} is None")
        return None, None
    check_tensor(name, x, ndim=2, like=t)
    check_shape(name, x, (B, H))
    if present is None:
        present = torch.ones(B, dtype=torch.bool, device=t.device)
    check_tensor(f"has_{name}", present, ndim=1, dtypes=(torch.bool,))
    check_shape(f"has_{name}", present, (B,))
    return x, present.view(torch.uint8)


def gated_fusion(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor | None = None,
                 a: torch.Tensor | None = None, has_v: torch.Tensor | None = None,
                 has_a: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """t [B, T, H]; weight [3, 3H] (rows g_v, g_a, g_t; columns v | a | t); bias [3]; v, a [B, H] or None."""
    check_tensor("t", t, ndim=3)
    B, T, H = t.shape
    check_tensor("weight", weight, ndim=2, like=t)
    check_shape("weight", weight, (3, 3 * H))
    check_tensor("bias", bias, ndim=1, like=t)
    check_shape("bias", bias, (3,))
    v, hv = _modality("v", v, has_v, t)
    a, ha = _modality("a", a, has_a, t)
    if out is None:
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
    check_tensor("out", out, ndim=3, like=t)
    check_shape("out", out, (B, T, H))
    if B * T == 0:
        return out
    dummy = bias
    args = dict(w_ptr=weight, b_ptr=bias, v_ptr=v if v is not None else dummy, a_ptr=a if a is not None else dummy,
                hv_ptr=hv if hv is not None else dummy, ha_ptr=ha if ha is not None else dummy, H=H,
                stride_w=weight.stride(0), stride_v=v.stride(0) if v is not None else 0,
                stride_a=a.stride(0) if a is not None else 0, HAS_V=v is not None, HAS_A=a is not None)
    inline = T == 1  # one row per sequence: nothing to share, skip the extra launch
    summary = min(SUMMARY_BLOCK, max(16, triton.next_power_of_2(H)))
    c = dummy
    if not inline:
        c = torch.empty(B, 3, device=t.device, dtype=torch.float32)
        fusion_summary_kernel[(B,)](c_ptr=c, BLOCK=summary, num_warps=SUMMARY_WARPS, **args)
    block_h = max(16, triton.next_power_of_2(H))
    warps = _warps(block_h)
    t2, z2 = as_rows("t", t, H), as_rows("out", out, H)
    gated_fusion_kernel[(triton.cdiv(B * T, ROWS),)](t2, z2, c_ptr=c, n_rows=B * T, T=T, stride_tr=t2.stride(0),
                                                     stride_zr=z2.stride(0), INLINE_SUMMARY=inline, ROWS=ROWS,
                                                     BLOCK_H=block_h, SUMMARY=summary, num_warps=warps, **args)
    return out


def _warps(block_h: int) -> int:
    # ROWS x 8 fp32 per thread for each of the row tile's tensors at BLOCK_H 4096: with fewer warps ptxas spills.
    return 16 if block_h >= 4096 else 8 if block_h >= 2048 else 4


def reference_fusion(t, weight, bias, v=None, a=None, has_v=None, has_a=None):
    """Eager fp32 math of the gated fusion (see autoglm_fast/reference/fusion.py for the module)."""
    B, T, H = t.shape
    c = compute_dtype(t.dtype)
    zeros, no = t.new_zeros(B, H, dtype=c), torch.zeros(B, dtype=torch.bool, device=t.device)
    pv = no if v is None else (has_v if has_v is not None else ~no)
    pa = no if a is None else (has_a if has_a is not None else ~no)
    v32 = zeros if v is None else torch.where(pv[:, None], v.to(c), 0.0)
    a32 = zeros if a is None else torch.where(pa[:, None], a.to(c), 0.0)
    x = torch.cat([v32[:, None].expand(B, T, H), a32[:, None].expand(B, T, H), t.to(c)], -1)
    g = torch.sigmoid(x @ weight.to(c).T + bias.to(c))
    g = g * torch.stack([pv, pa, ~no], -1)[:, None].to(c)
    return (g[..., :1] * v32[:, None] + g[..., 1:2] * a32[:, None] + g[..., 2:] * t.to(c)).to(t.dtype)


def compile_specs():
    """The launches at GLM-4-9B's hidden 3584 (weight [3, 3H], contiguous rows; compile matrix): a prefill of
    T=300 text rows in one sequence (summary kernel, then rows), and a decode step of 64 rows (T=1: summary
    inline)."""
    from .specs import CompileSpec, TensorArg
    H, T, decode_rows = 3584, 300, 64
    block_h, summary = triton.next_power_of_2(H), min(SUMMARY_BLOCK, triton.next_power_of_2(H))
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        common = {"w_ptr": t, "b_ptr": t, "v_ptr": t, "a_ptr": t, "hv_ptr": TensorArg("u8"), "ha_ptr": TensorArg("u8"),
                  "H": H, "stride_w": 3 * H, "stride_v": H, "stride_a": H, "HAS_V": True, "HAS_A": True}
        for inline in (False, True):
            warps = _warps(block_h)
            args = {**common, "t_ptr": t, "z_ptr": t, "c_ptr": t if inline else TensorArg("fp32"),
                    "n_rows": decode_rows if inline else T, "T": 1 if inline else T, "stride_tr": H, "stride_zr": H,
                    "INLINE_SUMMARY": inline, "ROWS": ROWS, "BLOCK_H": block_h, "SUMMARY": summary}
            specs.append(CompileSpec("gated_fusion", gated_fusion_kernel, args, num_warps=warps,
                                     label=f"{dtype} H={H} {'T=1 inline' if inline else f'T={T}'} ROWS={ROWS} "
                                           f"w{warps}"))
        specs.append(CompileSpec("fusion_summary", fusion_summary_kernel,
                                 {**common, "c_ptr": TensorArg("fp32"), "BLOCK": summary},
                                 num_warps=SUMMARY_WARPS, hot=False, label=f"{dtype} H={H} w{SUMMARY_WARPS}"))
    return specs
