"""pytest-benchmark view of the adapter / fusion kernels at real shapes (GPU only):

    pytest benchmarks/ --benchmark-columns=median,iqr,ops
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("impl", ["fast", "eager"])
@pytest.mark.parametrize("batch, seq, in_dim", [(1, 257, 1024), (8, 257, 1024), (32, 257, 1024), (1, 375, 384)])
def test_adapter(benchmark, impl, batch, seq, in_dim):
    from autoglm_fast.fast import FastDualPathAdapter
    from autoglm_fast.reference.adapter import DualPathAdapter
    ref = DualPathAdapter(in_dim, 512).cuda().half().eval()
    module = FastDualPathAdapter.from_reference(ref) if impl == "fast" else ref
    x = torch.randn(batch, seq, in_dim, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        benchmark(_sync(lambda: module(x)))


@pytest.mark.parametrize("impl", ["fast", "eager"])
@pytest.mark.parametrize("rows", [1, 4096])
def test_gated_fusion(benchmark, impl, rows):
    from autoglm_fast.fast import FastGatedFusion
    from autoglm_fast.reference.fusion import GatedFusion
    ref = GatedFusion(3584).cuda().half().eval()
    module = FastGatedFusion.from_reference(ref) if impl == "fast" else ref
    t = torch.randn(1, rows, 3584, device="cuda", dtype=torch.float16)
    v, a = torch.randn_like(t[:, 0]), torch.randn_like(t[:, 0])
    with torch.no_grad():
        benchmark(_sync(lambda: module(t, v, a)))
