"""adapter_attention (non-causal flash attention over the packed qkv, key-padding mask) vs eager."""
import pytest
import torch

from autoglm_fast.kernels.adapter_attention import adapter_attention, reference_attention
from kernel_harness import DEVICE, DOT_DTYPES, assert_matches, nan_like, odd_sizes, randn, requires_kernels

pytestmark = requires_kernels


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("L", odd_sizes(6))
@pytest.mark.parametrize("heads, head_dim", [(8, 7), (8, 64), (2, 16)])
def test_matches_reference(dtype, L, heads, head_dim):
    torch.manual_seed(L + heads)
    qkv = randn(2, L, 3 * heads * head_dim, dtype=dtype)
    out = nan_like((2, L, heads * head_dim), dtype)
    got = adapter_attention(qkv, heads, out=out)
    assert got is out
    assert_matches(got, reference_attention, qkv, heads)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_key_padding_mask_matches_reference_and_each_clip_alone(dtype):
    """Ragged batch: padded keys (filled with garbage) never change the real rows."""
    torch.manual_seed(0)
    heads, d, lengths = 8, 8, [81, 17, 1]
    L = max(lengths)
    clips = [randn(n, 3 * heads * d, dtype=dtype) for n in lengths]
    qkv = randn(3, L, 3 * heads * d, dtype=dtype, scale=1e3)  # garbage where there is padding
    for i, c in enumerate(clips):
        qkv[i, :len(c)] = c
    mask = torch.arange(L, device=DEVICE)[None] >= torch.tensor(lengths, device=DEVICE)[:, None]
    got = adapter_attention(qkv, heads, mask)
    for i, n in enumerate(lengths):  # each clip's rows against the clip alone: the padding never leaks in
        assert_matches(got[i, :n], lambda clip: reference_attention(clip[None], heads)[0], clips[i])


def test_a_full_30_second_audio_window():
    """1500 positions (Whisper's 30 s) with a padded tail, on one small head to stay quick in the interpreter."""
    qkv = randn(1, 1500, 3 * 16, dtype=torch.float16)
    mask = torch.zeros(1, 1500, dtype=torch.bool, device=DEVICE)
    mask[0, 1400:] = True
    assert_matches(adapter_attention(qkv, 1, mask), reference_attention, qkv, 1, mask)


def test_bad_inputs_name_the_argument():
    qkv = randn(2, 5, 48)
    with pytest.raises(ValueError, match="qkv's last dimension 48 must be 3 \\* num_heads"):
        adapter_attention(qkv, 5)
    with pytest.raises(ValueError, match="qkv must be 3-D"):
        adapter_attention(randn(5, 48), 8)
    with pytest.raises(ValueError, match="qkv must have a unit stride"):
        adapter_attention(randn(2, 48, 5).transpose(1, 2), 8)
    with pytest.raises(TypeError, match="key_padding_mask has dtype torch.float32"):
        adapter_attention(qkv, 8, torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask must have shape \\(2, 5\\)"):
        adapter_attention(qkv, 8, torch.zeros(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="qkv is on meta"):
        adapter_attention(torch.empty(2, 5, 48, device="meta"), 8)
