"""The online-softmax step shared by the flash-attention kernels (adapter and paged backbone), and the
probabilities their eager references use."""
import torch
import triton
import triton.language as tl


def eager_probs(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scores) in the scores' (compute) dtype, rounded once to `dtype`, the inputs' dtype: eager
    attention in fp16/bf16 feeds its P @ V matmul probabilities of that dtype, and so do these kernels
    (`p.to(v.dtype)` below). The tests' "eager error" must include that rounding (FlashAttention's rule
    compares against PyTorch run in the same dtype); for fp64 inputs nothing is rounded."""
    return scores.softmax(-1).to(dtype).to(scores.dtype)


@triton.jit
def softmax_step(acc, l_i, m_i, s, v, IEEE: tl.constexpr):
    """Fold one key tile into the running (acc, row sum, row max). `s` holds scores in the log2
    domain with masked keys at -inf; m_i starts finite, so a fully masked tile adds exactly 0."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new
