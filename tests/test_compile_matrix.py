"""Every kernel compiles for sm_80 (A100), sm_89 (RTX 4090) and sm_90 (H100/H200) on this GPU-less
machine, at each config its launcher can pick: shared memory within the target's limit and no
register spills in the hot kernels. The table is printed into the test log."""
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from autoglm_fast.kernels.compile_matrix import TARGETS, all_specs, compile_spec, format_table


def _compile(i_target):
    i, target = i_target
    return compile_spec(all_specs()[i], target)


@pytest.fixture(scope="module")
def results():
    jobs = [(i, t) for i in range(len(all_specs())) for t in TARGETS]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(_compile, jobs, chunksize=4))


def test_every_kernel_compiles_for_every_target(results, capsys):
    with capsys.disabled():
        print("\n" + format_table(results))
    failed = [f"{r.kernel} [{r.label}] on {r.target}: {'; '.join(r.errors)}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


def test_matrix_covers_every_kernel_and_target(results):
    kernels = {r.kernel for r in results}
    assert {"linear+gelu", "linear+residual", "linear+layernorm", "adapter_attention", "gated_fusion"} <= kernels
    for k in kernels:
        assert {r.target for r in results if r.kernel == k} == set(TARGETS)
