"""Every config of every autotuned or table-tuned kernel, forced one at a time (`forced_config`), against the
reference.

The interpreter keeps only the first config and a GPU runs only the one that wins its benchmark (or its table), so
without this a shipped config could be wrong and never run in a test. Shapes are small but span several
tiles of the largest config (145 = 128 + 17), so tile edges and masks are crossed in every config.
"""
import importlib
import pkgutil

import pytest
import torch
import triton

import autoglm_fast.kernels as kernels_pkg
from autoglm_fast.kernels import adapter_attention as attn_mod
from autoglm_fast.kernels import linear as linear_mod
from autoglm_fast.kernels import paged_attention as paged_mod
from autoglm_fast.kernels.utils import TableTuned, config_name, device_target, forced_config
from kernel_harness import DEVICE, DOT_DTYPES, ON_GPU, assert_matches, nan_like, randn, requires_kernels
from paged_helpers import SMALL, cache_args, chunk_step, make_cache, queries

pytestmark = requires_kernels
M = 145


def _linear(dtype):
    x, w, b, r = randn(M, 81, dtype=dtype), randn(M, 81, dtype=dtype, scale=0.1), randn(M, dtype=dtype), \
        randn(M, M, dtype=dtype)
    got = linear_mod.fused_linear(x, w, b, epilogue="residual", residual=r, out=nan_like((M, M), dtype))
    assert_matches(got, linear_mod.reference_linear, x, w, b, epilogue="residual", residual=r)


def _linear_layernorm(dtype):
    x, w, b, lw, lb = randn(M, 81, dtype=dtype), randn(81, 81, dtype=dtype, scale=0.1), randn(81, dtype=dtype), \
        randn(81, dtype=dtype), randn(81, dtype=dtype)
    kw = dict(epilogue="layernorm", ln_weight=lw, ln_bias=lb)
    got = linear_mod.fused_linear(x, w, b, out=nan_like((M, 81), dtype), **kw)
    assert_matches(got, linear_mod.reference_linear, x, w, b, **kw)


def _adapter_attention(dtype):
    qkv = randn(2, M, 3 * 2 * 64, dtype=dtype)
    mask = torch.arange(M, device=DEVICE)[None] >= torch.tensor([M, 70], device=DEVICE)[:, None]
    got = attn_mod.adapter_attention(qkv, 2, mask, out=nan_like((2, M, 128), dtype))
    assert_matches(got, attn_mod.reference_attention, qkv, 2, mask)


def _paged_prefill(dtype):
    name = config_name(paged_mod.paged_prefill_kernel.configs[0])  # the config forced_config forces
    if ON_GPU and device_target(torch.cuda.current_device()) not in paged_mod.PREFILL_TARGETS[name]:
        pytest.skip(f"{name} is not offered on this GPU")
    cache = make_cache(*SMALL, 16, dtype)
    meta = chunk_step(cache, [40, 0], [81, M])  # a chunk on a cached prefix, and a fresh prompt
    q = queries(81 + M, *SMALL, dtype)
    got = paged_mod.paged_prefill_attention(q, *cache_args(cache, meta), meta.max_query_len,
                                            out=nan_like(q.shape, dtype))
    assert_matches(got, paged_mod.reference_paged_attention, q, *cache_args(cache, meta))


CASES = {linear_mod.linear_kernel: _linear, linear_mod.linear_layernorm_kernel: _linear_layernorm,
         attn_mod.adapter_attention_kernel: _adapter_attention, paged_mod.paged_prefill_kernel: _paged_prefill}


def _autotuned_kernels():
    mods = [importlib.import_module(f"autoglm_fast.kernels.{m.name}")
            for m in pkgutil.iter_modules(kernels_pkg.__path__)]
    return {obj for mod in mods for obj in vars(mod).values()
            if isinstance(obj, (triton.runtime.Autotuner, TableTuned))}


def test_every_autotuned_kernel_has_a_case():
    found = _autotuned_kernels()
    assert found == set(CASES), f"autotuned kernels without a case here: {[k.fn.__name__ for k in found - set(CASES)]}"
    assert all(len(k.all_configs) > 1 for k in found)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("kernel, index", [(k, i) for k in CASES for i in range(len(k.all_configs))],
                         ids=lambda v: getattr(getattr(v, "fn", None), "__name__", str(v)))
def test_each_config_matches_reference(kernel, index, dtype):
    torch.manual_seed(index)
    with forced_config(kernel, kernel.all_configs[index]):
        CASES[kernel](dtype)
