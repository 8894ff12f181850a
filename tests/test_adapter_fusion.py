"""DualPathAdapter against the article's class, and the gated fusion against a hand computation."""
import pytest
import torch
from torch import nn

from agreement import assert_close_across_shapes
from autoglm_fast.reference.adapter import DualPathAdapter
from autoglm_fast.reference.fusion import GatedFusion


# --- The article's class, copied verbatim (seed/ article, section 4.3) ---------------------------
class ArticleDualPathAdapter(nn.Module):
    def __init__(self, input_dim, hidden_dim=512):
        super().__init__()
        # 通路1：线性投影 + LayerNorm
        self.proj = nn.Linear(input_dim, hidden_dim)
        self.ln = nn.LayerNorm(hidden_dim)
        # 通路2：轻量级Transformer Encoder Block
        self.attn = nn.MultiheadAttention(embed_dim=hidden_dim, num_heads=8, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim * 4),
            nn.GELU(),
            nn.Linear(hidden_dim * 4, hidden_dim)
        )
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        # 通路1：快速对齐
        h = self.ln(self.proj(x))
        # 通路2：精细调制
        attn_out, _ = self.attn(h, h, h)
        ffn_out = self.ffn(attn_out)
        out = h + self.dropout(ffn_out)  # 残差连接
        return out
# ---------------------------------------------------------------------------------------------------


def _jitter(module: nn.Module) -> None:
    with torch.no_grad():  # LayerNorm affine and biases away from their init, so they are exercised
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("input_dim, hidden, batch, seq", [(1024, 512, 2, 17), (384, 512, 1, 1), (30, 56, 3, 33)])
def test_adapter_equals_article_class(input_dim, hidden, batch, seq):
    torch.manual_seed(0)
    article = ArticleDualPathAdapter(input_dim, hidden)
    _jitter(article)
    ours = DualPathAdapter(input_dim, hidden)
    assert set(ours.state_dict()) == set(article.state_dict())
    ours.load_state_dict(article.state_dict())
    article.eval(), ours.eval()
    x = torch.randn(batch, seq, input_dim)
    with torch.no_grad():
        assert_close_across_shapes(ours(x), article(x))


def test_adapter_train_mode_applies_dropout_to_ffn_path_only():
    torch.manual_seed(0)
    ours = DualPathAdapter(16, 56).train()
    x = torch.randn(2, 5, 16)
    h = ours.ln(ours.proj(x))
    assert not torch.allclose(ours(x), ours(x))  # dropout is live in training
    ours.dropout.p = 1.0
    assert torch.allclose(ours(x), h)  # with the FFN path dropped, only path 1 remains


def test_padding_mask_leaves_real_rows_unchanged():
    torch.manual_seed(0)
    ours = DualPathAdapter(24, 56).eval()
    _jitter(ours)
    lengths = [7, 3, 1]
    clips = [torch.randn(n, 24) for n in lengths]
    padded = torch.zeros(3, 7, 24)
    for i, c in enumerate(clips):
        padded[i, :len(c)] = c
    padded[1, 3:] = 1e3  # garbage in the padding must not leak into real rows
    mask = torch.arange(7)[None] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batched = ours(padded, key_padding_mask=mask)
        for i, c in enumerate(clips):
            alone = ours(c[None])[0]
            assert_close_across_shapes(batched[i, :lengths[i]], alone)


# --- gated fusion ---------------------------------------------------------------------------------------
def test_fusion_matches_hand_computation():
    torch.manual_seed(0)
    H = 5
    fusion = GatedFusion(H)
    _jitter(fusion)
    t, v, a = torch.randn(2, 3, H), torch.randn(2, H), torch.randn(2, H)
    W, b = fusion.gate.weight, fusion.gate.bias
    z = fusion(t, v, a)
    for i in range(2):
        for j in range(3):
            x = torch.cat([v[i], a[i], t[i, j]])
            g = [torch.sigmoid(sum(W[k, n] * x[n] for n in range(3 * H)) + b[k]) for k in range(3)]
            expect = g[0] * v[i] + g[1] * a[i] + g[2] * t[i, j]
            assert torch.allclose(z[i, j], expect, atol=1e-6)
            assert torch.allclose(fusion.gates(t, v, a, torch.ones(2, dtype=torch.bool),
                                               torch.ones(2, dtype=torch.bool))[i, j], torch.stack(g), atol=1e-6)


def test_absent_modality_contributes_exactly_zero():
    torch.manual_seed(0)
    H = 7
    fusion = GatedFusion(H)
    _jitter(fusion)
    t, v, a = torch.randn(3, 4, H), torch.randn(3, H), torch.randn(3, H)
    has_v = torch.tensor([True, False, True])
    has_a = torch.tensor([False, False, True])
    z = fusion(t, v, a, has_v, has_a)
    # Row 1 has neither: what it gets alone without vectors (to rounding: a batch and one row are computed
    # in different shapes), and exactly what it gets alone with garbage vectors marked absent.
    no_media = fusion(t[1:2])
    assert_close_across_shapes(z[1:2], no_media)
    garbage = torch.full((1, H), 1e6)
    none = torch.zeros(1, dtype=torch.bool)
    assert torch.equal(fusion(t[1:2], garbage, garbage, none, none), no_media)
    W, b = fusion.gate.weight, fusion.gate.bias
    g_t = torch.sigmoid(t[1] @ W[2, 2 * H:] + b[2])  # v = a = 0 in the gate input
    assert torch.allclose(no_media[0], g_t[:, None] * t[1], atol=1e-6)
    # Row 0 has vision only: whatever is passed as its audio vector changes nothing.
    a_garbage = a.clone()
    a_garbage[0] = 1e6
    assert torch.equal(fusion(t, v, a_garbage, has_v, has_a)[0], z[0])
    g = fusion.gates(t, v * has_v[:, None], a * has_a[:, None], has_v, has_a)
    assert torch.all(g[0, :, 1] == 0) and torch.all(g[1, :, :2] == 0) and torch.all(g[2] > 0)


def test_fusion_shape_errors():
    fusion = GatedFusion(4)
    with pytest.raises(ValueError, match="v must have shape"):
        fusion(torch.randn(2, 3, 4), v=torch.randn(3, 4))
    with pytest.raises(ValueError, match="has_a marks rows present but a is None"):
        fusion(torch.randn(2, 3, 4), has_a=torch.tensor([True, False]))
