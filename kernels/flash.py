"""The online-softmax step shared by the flash-attention kernels (adapter and paged backbone)."""
import triton
import triton.language as tl


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
