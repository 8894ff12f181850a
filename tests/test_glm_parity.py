"""Our GLM decoder vs transformers' GlmForCausalLM on tiny random configs, weights copied by name."""
import pytest
import torch
import transformers

from autoglm_fast.config import TextConfig
from autoglm_fast.reference.glm import GlmForCausalLM

CONFIGS = [  # nano-like (GQA 3:1, head_dim 12 -> 6 rotary channels) and a full-width-rotary MQA variant
    dict(vocab_size=300, hidden_size=72, intermediate_size=152, num_hidden_layers=3, num_attention_heads=6,
         num_key_value_heads=2, head_dim=12, partial_rotary_factor=0.5),
    dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=1, head_dim=20, partial_rotary_factor=0.2, rope_theta=500.0),
]


def make_pair(kw: dict):
    torch.manual_seed(0)
    ours_kw = {k: v for k, v in kw.items() if k != "rope_theta"}
    theta = kw.get("rope_theta", 10000.0)
    ours = GlmForCausalLM(TextConfig(**ours_kw, rope_theta=theta)).eval()
    hf_cfg = transformers.GlmConfig(**{k: v for k, v in ours_kw.items() if k != "partial_rotary_factor"},
                                    rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                     "partial_rotary_factor": kw["partial_rotary_factor"]},
                                    attn_implementation="eager", rms_norm_eps=1.5625e-7,
                                    pad_token_id=0)
    hf = transformers.GlmForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so no parameter hides behind its init
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_state = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert set(hf_state) == set(ours.state_dict())
    ours.load_state_dict(hf_state, strict=True)
    return ours, hf


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 16), (2, 33)])
def test_prefill_logits_match_transformers(kw, batch, seq):
    ours, hf = make_pair(kw)
    ids = torch.randint(0, kw["vocab_size"], (batch, seq))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("kw", CONFIGS)
def test_decode_with_cache_matches_transformers(kw):
    ours, hf = make_pair(kw)
    batch, prompt, steps = 2, 5, 12
    ids = torch.randint(0, kw["vocab_size"], (batch, prompt + steps))
    with torch.no_grad():
        full = hf(ids).logits  # every position at once, no cache
        hf_cache = transformers.DynamicCache(config=hf.config)
        hf_steps = [hf(ids[:, :prompt], cache=hf_cache, use_cache=True).logits]
        caches = ours.setup_caches(batch, prompt + steps)
        got = [ours(ids[:, :prompt], positions=torch.arange(prompt), caches=caches)]
        for t in range(prompt, prompt + steps):
            hf_steps.append(hf(ids[:, t:t + 1], cache=hf_cache, use_cache=True).logits)
            got.append(ours(ids[:, t:t + 1], positions=torch.tensor([t]), caches=caches))
    got, hf_steps = torch.cat(got, 1), torch.cat(hf_steps, 1)
    assert (got - full).abs().max() <= 1e-4
    assert (got - hf_steps).abs().max() <= 1e-4


def test_per_row_positions_decode_rows_independently():
    """Rows at different positions in one batch (continuous batching) match each sequence alone:
    row 0 continues a sequence at positions 4..7 while row 1 starts a new one at 0..3 over stale slots."""
    ours, _ = make_pair(CONFIGS[0])
    a, b, junk = (torch.randint(0, 300, (1, n)) for n in (8, 4, 4))
    with torch.no_grad():
        ref_a, ref_b = ours(a)[0, -1], ours(b)[0, -1]
        caches = ours.setup_caches(2, 16)
        ours(torch.cat([a[:, :4], junk]), positions=torch.arange(4), caches=caches)
        pos = torch.stack([torch.arange(4, 8), torch.arange(4)])
        out = ours(torch.cat([a[:, 4:], b]), positions=pos, caches=caches)
    assert (out[0, -1] - ref_a).abs().max() <= 1e-4
    assert (out[1, -1] - ref_b).abs().max() <= 1e-4


def test_bad_positions_raise():
    ours, _ = make_pair(CONFIGS[0])
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="positions has shape"):
        ours(ids, positions=torch.arange(4))
    with pytest.raises(TypeError, match="positions must be an int"):
        ours(ids, positions=torch.zeros(3))
    with pytest.raises(ValueError, match="past the cache length"):
        ours(ids, positions=torch.arange(3) + 6, caches=ours.setup_caches(1, 8))
