"""SamplingParams validation and Sampler semantics (vLLM order of operations), on CPU."""
import math

import pytest
import torch

from autoglm_fast.sampling import (SampleOutput, Sampler, SamplingParams, apply_penalties,
                                   apply_top_k_top_p_min_p, make_generator, token_counts)

V = 32
EOS = 7


def run(sampler, logits, params, outputs=None, prompts=None, seeds=None) -> SampleOutput:
    """One sampler step with fresh generators for the given seeds (None -> global RNG)."""
    b = logits.shape[0]
    outputs = outputs if outputs is not None else [[] for _ in range(b)]
    prompts = prompts if prompts is not None else [[] for _ in range(b)]
    seeds = seeds if seeds is not None else [p.seed for p in params]
    gens = [None if s is None else make_generator(s) for s in seeds]
    return sampler.sample(logits, params, prompts, outputs, gens)


@pytest.mark.parametrize("kwargs, field, allowed", [
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", ">= -1"),
    ({"min_p": 1.1}, "min_p", "[0, 1]"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
    ({"presence_penalty": -3}, "presence_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"logprobs": 21}, "logprobs", "[0, 20]"),
    ({"logprobs": -1}, "logprobs", "[0, 20]"),
    ({"stop": ["ok", ""]}, "stop", "non-empty strings"),
    ({"stop": [3]}, "stop", "non-empty strings"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"seed": 1.5}, "seed", ">= 0"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens=4"),
])
def test_params_validation_names_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"{field} must be") and allowed in msg


def test_params_defaults_and_helpers():
    p = SamplingParams(stop="###", top_k=-1, stop_token_ids=(1, 2))
    assert p.stop == ["###"] and p.stop_token_ids == [1, 2] and not p.is_greedy
    g = SamplingParams.greedy(max_tokens=3)
    assert g.temperature == 0 and g.is_greedy and g.max_tokens == 3
    assert SamplingParams().stop is not SamplingParams().stop       # no shared mutable default


def test_greedy_is_argmax_and_top_k_1_matches_it():
    logits = torch.randn(6, V, generator=make_generator(0))
    sampler = Sampler()
    out = run(sampler, logits, [SamplingParams.greedy()] * 6)
    assert out.tokens.dtype == torch.int64 and out.tokens.equal(logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None
    for temp in (0.3, 1.0, 5.0):
        params = [SamplingParams(temperature=temp, top_k=1)] * 6
        assert run(sampler, logits, params, seeds=list(range(6))).tokens.equal(logits.argmax(-1))


def test_same_seed_reproducible_and_independent_of_batch():
    sampler = Sampler()
    row = torch.zeros(1, V)                              # flat: every token equally likely
    p = SamplingParams(seed=123)
    alone = run(sampler, row, [p]).tokens.item()
    assert run(sampler, row, [p]).tokens.item() == alone
    others = torch.randn(4, V)
    for pos in range(5):                                 # any position among unseeded rows
        logits = torch.cat([others[:pos], row, others[pos:]])
        params = [SamplingParams(temperature=0.7, top_p=0.9)] * 5
        params[pos] = p
        assert run(sampler, logits, params).tokens[pos].item() == alone


def test_different_seeds_differ():
    sampler = Sampler()
    logits = torch.zeros(20, V)
    params = [SamplingParams(seed=s) for s in range(20)]
    assert len(set(run(sampler, logits, params).tokens.tolist())) > 5


def test_empirical_distribution_matches_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    n = 20_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens = run(Sampler(), logits.expand(n, -1), [SamplingParams()] * n).tokens
    freq = torch.bincount(tokens, minlength=5).float()
    expect = logits[0].softmax(-1) * n
    chi2 = ((freq - expect) ** 2 / expect).sum().item()
    assert chi2 < 18.5                                   # 4 dof: p ~ 0.001


def test_top_p_keeps_exactly_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4, -1)
    top_p = torch.tensor([0.4, 0.7, 0.85, 1.0])
    out = apply_top_k_top_p_min_p(logits, torch.zeros(4), top_p, torch.zeros(4))
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in out]
    assert kept == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert torch.equal(out[3], logits[3])                # p == 1 leaves the row untouched


def test_min_p_and_top_k_hand_examples():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(3, -1)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0, 0, 2]), torch.ones(3),
                                  torch.tensor([0.5, 0.2, 0.0]))
    kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in out]
    assert kept == [[1, 3], [0, 1, 3], [1, 3]]           # threshold 0.25, 0.1; top-2
    # Sampling only ever returns kept tokens.
    params = [SamplingParams(min_p=0.5)] * 2000
    tokens = run(Sampler(), logits[:1].expand(2000, -1), params).tokens
    assert set(tokens.tolist()) == {1, 3}


def test_penalty_formulas_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5],
                           [2.0, -2.0, 1.0, -1.0, 0.5]])
    prompts = [[0, 1], [0]]
    outputs = [[2, 2], [1, 1, 1, 4]]
    rep = torch.tensor([2.0, 1.0])
    freq = torch.tensor([0.0, 0.5])
    pres = torch.tensor([0.0, 0.25])
    out_counts = token_counts(outputs, 2, 5, torch.device("cpu"))
    seen = (out_counts > 0) | (token_counts(prompts, 2, 5, torch.device("cpu")) > 0)
    out = apply_penalties(logits, out_counts, seen, rep, freq, pres)
    # Row 0: repetition 2 on prompt+output {0, 1, 2}: positive / 2, negative * 2.
    assert out[0].tolist() == [1.0, -4.0, 0.5, -1.0, 0.5]
    # Row 1: output counts {1: 3, 4: 1}; the prompt token 0 is not frequency/presence penalized.
    assert out[1].tolist() == pytest.approx([2.0, -2.0 - 1.5 - 0.25, 1.0, -1.0, 0.5 - 0.5 - 0.25])
    padded = torch.tensor([[0, 1], [0, -1]])             # tensor form: -1 is padding
    assert token_counts(padded, 2, 5, torch.device("cpu")).equal(token_counts(prompts, 2, 5, torch.device("cpu")))
    assert Sampler().sample(logits, [SamplingParams.greedy(repetition_penalty=2.0, logprobs=0),
                                     SamplingParams.greedy(frequency_penalty=0.5, presence_penalty=0.25, logprobs=0)],
                            prompts, outputs, [None, None]).tokens.tolist() == out.argmax(-1).tolist()
    assert token_counts([[3, 3], []], 2, 5, torch.device("cpu")).tolist() == [
        [0, 0, 0, 2, 0], [0] * 5]


def test_min_tokens_blocks_eos_and_stop_ids():
    sampler = Sampler(eos_token_ids=[EOS])
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 3], logits[0, 9] = 10.0, 9.0, 8.0
    p = SamplingParams.greedy(min_tokens=2, stop_token_ids=[3])
    assert run(sampler, logits, [p], outputs=[[1]]).tokens.item() == 9
    assert run(sampler, logits, [p], outputs=[[1, 1]]).tokens.item() == EOS
    p_ign = SamplingParams.greedy(min_tokens=2, ignore_eos=True)
    assert run(sampler, logits, [p_ign], outputs=[[]]).tokens.item() == EOS


def test_logprobs_are_raw_and_top_lists_sorted():
    logits = torch.randn(3, V, generator=make_generator(1))
    params = [SamplingParams(logprobs=5, temperature=0.5, top_k=3, repetition_penalty=1.5, seed=1),
              SamplingParams.greedy(logprobs=0), SamplingParams()]
    out = run(Sampler(), logits, params, outputs=[[0, 1], [], []])
    raw = logits.log_softmax(-1)
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, raw.gather(1, out.tokens[:, None]).squeeze(1))
    top = out.top_logprobs
    assert len(top[0]) == 5 and top[1] == [] and top[2] == []
    values, ids = raw[0].sort(descending=True)
    assert [t for t, _ in top[0]] == ids[:5].tolist()
    assert [lp for _, lp in top[0]] == pytest.approx(values[:5].tolist())


def test_mixed_batch_matches_rows_alone():
    g = make_generator(2)
    logits = torch.randn(5, V, generator=g)
    params = [SamplingParams.greedy(),
              SamplingParams(temperature=0.8, top_p=0.9, seed=11),
              SamplingParams(temperature=1.2, top_k=5, min_p=0.05, seed=12),
              SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4,
                             seed=13),
              SamplingParams.greedy(repetition_penalty=2.0, min_tokens=1)]
    prompts = [[1, 2, 3], [4], [], [5, 6, 6], [logits[4].argmax().item()]]
    outputs = [[8], [9, 9], [10], [logits[3].argmax().item()] * 3, []]
    sampler = Sampler(eos_token_ids=[EOS])
    batch = run(sampler, logits, params, outputs, prompts)
    for i in range(5):
        alone = run(sampler, logits[i:i + 1], params[i:i + 1], outputs[i:i + 1], prompts[i:i + 1])
        assert batch.tokens[i].item() == alone.tokens.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    logits = torch.randn(4, V, generator=make_generator(3)).to(dtype)
    params = [SamplingParams.greedy(logprobs=2), SamplingParams(top_p=0.8, seed=5, logprobs=1),
              SamplingParams(frequency_penalty=1.0, seed=6), SamplingParams(top_k=4, seed=7)]
    before = logits.clone()
    out = run(Sampler(), logits, params, outputs=[[0], [1], [2], [3]])
    assert logits.equal(before)                          # caller's tensor untouched
    assert out.tokens.dtype == torch.int64 and out.tokens[0].item() == logits[0].float().argmax()
    assert out.logprobs.dtype == torch.float32 and all(math.isfinite(x) for x in out.logprobs.tolist())
    fp32 = run(Sampler(), logits.float(), params, outputs=[[0], [1], [2], [3]])
    assert out.tokens.equal(fp32.tokens)
