"""Every kernel compiles for sm_80 (A100), sm_89 (RTX 4090) and sm_90 (H100/H200) on this GPU-less
machine, at each config its launcher can pick: shared memory within the target's limit and no
register spills in the hot kernels. The table is printed into the test log."""
import pytest

from autoglm_fast.kernels.compile_matrix import TARGETS, compile_all, format_table


@pytest.fixture(scope="module")
def results():
    return compile_all()


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
