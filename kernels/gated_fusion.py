"""Gated three-way fusion: z = g_v*v + g_a*a + g_t*t with g = sigmoid(W_g [v; a; t] + b), per text row.

The v/a part of the gate logits, c[b] = W_g[:, :2H] [v_b; a_b] + b, is the same for every row of a
sequence: for prefill a tiny kernel computes it once per sequence, for single decode rows the row
kernel computes it inline. The row kernel then reads t once, does the three t-dots, and writes z once.
Absent modality (has_v / has_a false): vector 0 and gate 0. Eager reference: `reference_fusion`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import as_rows, check_shape, check_tensor, compute_dtype

SUMMARY_BLOCK = 1024


@triton.jit
def _summary_logits(w_ptr, b_ptr, v_ptr, a_ptr, has_v, has_a, seq, H, stride_w, stride_v, stride_a,
                    HAS_V: tl.constexpr, HAS_A: tl.constexpr, BLOCK: tl.constexpr):
    """c_k = W_k[:H] . v' + W_k[H:2H] . a' + b_k for k = v, a, t (v', a' zeroed when absent)."""
    c0 = tl.zeros((BLOCK,), dtype=tl.float32)
    c1 = tl.zeros((BLOCK,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, H, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < H
        if HAS_V:
            v = tl.where(has_v != 0, tl.load(v_ptr + seq * stride_v + offs, mask=m, other=0.0).to(tl.float32), 0.0)
            c0 += v * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
            c1 += v * tl.load(w_ptr + stride_w + offs, mask=m, other=0.0).to(tl.float32)
            c2 += v * tl.load(w_ptr + 2 * stride_w + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_A:
            a = tl.where(has_a != 0, tl.load(a_ptr + seq * stride_a + offs, mask=m, other=0.0).to(tl.float32), 0.0)
            c0 += a * tl.load(w_ptr + H + offs, mask=m, other=0.0).to(tl.float32)
            c1 += a * tl.load(w_ptr + stride_w + H + offs, mask=m, other=0.0).to(tl.float32)
            c2 += a * tl.load(w_ptr + 2 * stride_w + H + offs, mask=m, other=0.0).to(tl.float32)
    return (tl.sum(c0) + tl.load(b_ptr).to(tl.float32), tl.sum(c1) + tl.load(b_ptr + 1).to(tl.float32),
            tl.sum(c2) + tl.load(b_ptr + 2).to(tl.float32))


@triton.jit
def fusion_summary_kernel(w_ptr, b_ptr, v_ptr, a_ptr, hv_ptr, ha_ptr, c_ptr, H, stride_w, stride_v, stride_a,
                          HAS_V: tl.constexpr, HAS_A: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    has_v = tl.load(hv_ptr + seq) if HAS_V else 0
    has_a = tl.load(ha_ptr + seq) if HAS_A else 0
    c0, c1, c2 = _summary_logits(w_ptr, b_ptr, v_ptr, a_ptr, has_v, has_a, seq, H, stride_w, stride_v, stride_a,
                                 HAS_V, HAS_A, BLOCK)
    tl.store(c_ptr + seq * 3, c0)
    tl.store(c_ptr + seq * 3 + 1, c1)
    tl.store(c_ptr + seq * 3 + 2, c2)


@triton.jit
def gated_fusion_kernel(t_ptr, z_ptr, w_ptr, b_ptr, v_ptr, a_ptr, hv_ptr, ha_ptr, c_ptr, T, H, stride_tr,
                        stride_zr, stride_w, stride_v, stride_a, HAS_V: tl.constexpr, HAS_A: tl.constexpr,
                        INLINE_SUMMARY: tl.constexpr, BLOCK_H: tl.constexpr, SUMMARY: tl.constexpr):
    row = tl.program_id(0)
    seq = row // T
    has_v = tl.load(hv_ptr + seq) if HAS_V else 0
    has_a = tl.load(ha_ptr + seq) if HAS_A else 0
    if INLINE_SUMMARY:
        c0, c1, c2 = _summary_logits(w_ptr, b_ptr, v_ptr, a_ptr, has_v, has_a, seq, H, stride_w, stride_v,
                                     stride_a, HAS_V, HAS_A, SUMMARY)
    else:
        c0, c1, c2 = tl.load(c_ptr + seq * 3), tl.load(c_ptr + seq * 3 + 1), tl.load(c_ptr + seq * 3 + 2)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    t = tl.load(t_ptr + row.to(tl.int64) * stride_tr + offs, mask=m, other=0.0).to(tl.float32)
    wt = w_ptr + 2 * H + offs  # the t columns of W_g
    g_v = tl.sigmoid(c0 + tl.sum(t * tl.load(wt, mask=m, other=0.0).to(tl.float32)))
    g_a = tl.sigmoid(c1 + tl.sum(t * tl.load(wt + stride_w, mask=m, other=0.0).to(tl.float32)))
    g_t = tl.sigmoid(c2 + tl.sum(t * tl.load(wt + 2 * stride_w, mask=m, other=0.0).to(tl.float32)))
    z = g_t * t
    if HAS_V:
        v = tl.where(has_v != 0, tl.load(v_ptr + seq * stride_v + offs, mask=m, other=0.0).to(tl.float32), 0.0)
        z += tl.where(has_v != 0, g_v, 0.0) * v
    if HAS_A:
        a = tl.where(has_a != 0, tl.load(a_ptr + seq * stride_a + offs, mask=m, other=0.0).to(tl.float32), 0.0)
        z += tl.where(has_a != 0, g_a, 0.0) * a
    tl.store(z_ptr + row.to(tl.int64) * stride_zr + offs, z.to(z_ptr.dtype.element_ty), mask=m)


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
        fusion_summary_kernel[(B,)](c_ptr=c, BLOCK=summary, num_warps=4, **args)
    block_h = max(16, triton.next_power_of_2(H))
    # Rows of a sequence are T apart from each other's sequence: row r belongs to sequence r // T.
    t2, z2 = as_rows("t", t, H), as_rows("out", out, H)
    gated_fusion_kernel[(B * T,)](t2, z2, c_ptr=c, T=T, stride_tr=t2.stride(0), stride_zr=z2.stride(0),
                                  INLINE_SUMMARY=inline, BLOCK_H=block_h, SUMMARY=summary, num_warps=_warps(block_h),
                                  **args)
    return out


def _warps(block: int) -> int:
    # 8 elements per thread for the full 3584-wide row: fewer warps make ptxas spill on sm_89.
    return 16 if block >= 4096 else 8 if block >= 2048 else 4


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
    T=300 text rows per sequence (summary kernel, then rows), and decode (T=1: summary inline)."""
    from .specs import CompileSpec, TensorArg
    H, T = 3584, 300
    block_h, summary = triton.next_power_of_2(H), min(SUMMARY_BLOCK, triton.next_power_of_2(H))
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        common = {"w_ptr": t, "b_ptr": t, "v_ptr": t, "a_ptr": t, "hv_ptr": TensorArg("u8"), "ha_ptr": TensorArg("u8"),
                  "H": H, "stride_w": 3 * H, "stride_v": H, "stride_a": H, "HAS_V": True, "HAS_A": True}
        for inline in (False, True):
            args = {**common, "t_ptr": t, "z_ptr": t, "c_ptr": t if inline else TensorArg("fp32"),
                    "T": 1 if inline else T, "stride_tr": H, "stride_zr": H, "INLINE_SUMMARY": inline,
                    "BLOCK_H": block_h, "SUMMARY": summary}
            specs.append(CompileSpec("gated_fusion", gated_fusion_kernel, args, num_warps=_warps(block_h),
                                     label=f"{dtype} H={H} {'T=1 inline summary' if inline else 'rows'} "
                                                         f"w{_warps(block_h)}"))
        specs.append(CompileSpec("fusion_summary", fusion_summary_kernel,
                                 {**common, "c_ptr": TensorArg("fp32"), "BLOCK": summary}, num_warps=4,
                                 hot=False, label=f"{dtype} H={H} w4"))
    return specs
