"""A decode step's backbone launches at most 8 kernels per layer on the graph path (plus the final norm):

    input norm (+ the previous layer's MLP residual add, + GLM-4.1V's post-MLP sandwich norm)
    qkv GEMM · RoPE + K/V cache write · decode attention (split merge inside) · o GEMM
    post-attention norm (+ residual add, + sandwich norm) · gate_up GEMM · down GEMM (+ SwiGLU on its input)

On CPU the static-buffer step the CUDA graphs capture runs eagerly; every kernel a GPU would run is then
either a Triton launch or an ATen op that is not a view or an allocation, and both are counted (ATen ops
made inside a Triton launch are the interpreter's, not the model's). On a GPU the profiler counts the
kernels themselves, cuBLAS's included."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from kernel_harness import requires_kernels

pytestmark = requires_kernels
aten = torch.ops.aten
LAUNCHES_PER_LAYER = 8
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
NO_KERNEL = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.lift_fresh, aten.detach,
             aten._local_scalar_dense, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.is_same_size}


class LaunchCounter(TorchDispatchMode):
    """Names of the kernels a region launches: Triton kernels and the ATen ops that run one."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.names: list[str] = []
        self.in_triton = 0
        import triton.runtime.interpreter as interp
        from triton.runtime.jit import JITFunction
        for cls in (interp.InterpretedFunction, JITFunction):
            monkeypatch.setattr(cls, "run", self._counting(cls.run))

    def _counting(self, run):
        counter = self

        def counted(fn, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counter.names.append(f"triton:{fn.fn.__name__}")
            counter.in_triton += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                counter.in_triton -= 1
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_triton and not func.is_view and func.overloadpacket not in NO_KERNEL:
            self.names.append(f"aten:{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def _decode_backbone_launches(engine, prompts, monkeypatch) -> list[str]:
    params = SamplingParams.greedy(max_tokens=6, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()  # prefill
    backbone = engine.runtime.backbone
    counter = LaunchCounter(monkeypatch)
    counted: list[list[str]] = []
    forward = backbone.forward

    def counting_forward(*args, **kwargs):
        start = len(counter.names)
        with counter:
            out = forward(*args, **kwargs)
        counted.append(counter.names[start:])
        return out
    monkeypatch.setattr(backbone, "forward", counting_forward)
    engine.step()  # a decode step of every request through the graph path
    monkeypatch.undo()
    assert len(counted) == 1, "the decode step should run the backbone once"
    return counted[0]


@pytest.mark.parametrize("preset", ["nano", "glm4v-tiny"])  # GQA layers without / with sandwich norms, M-RoPE
def test_decode_layer_launches_at_most_eight_kernels(preset, monkeypatch):
    engine = Engine.from_preset(preset, seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    layers = engine.config.text.num_hidden_layers
    long = list(range(3, 3 + 90))  # a context over several splits of the decode kernel
    names = _decode_backbone_launches(engine, [[5, 6, 7], long], monkeypatch)
    per_layer = (len(names) - 1) / layers  # - the final norm
    assert per_layer <= LAUNCHES_PER_LAYER, (per_layer, names)
    assert names.count("triton:rms_norm_kernel") == 2 * layers + 1, names  # two per layer and the final one
    assert not any("swiglu_kernel" == n.split(":")[1] for n in names), names  # fused into the down GEMM
    assert not any(n.startswith("aten:") and n.split(":")[1] in ("cos", "sin", "add", "mul") for n in names), names


def test_the_counter_sees_an_extra_launch(monkeypatch):
    """The instrument itself: an elementwise op slipped into a layer is counted, a view is not."""
    engine = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    layers = engine.config.text.num_hidden_layers
    mlp = engine.runtime.backbone.layers[0].mlp
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x, out=None: forward(x.view(x.shape) * 1.0, out=out))
    names = _decode_backbone_launches(engine, [[5, 6, 7]], monkeypatch)
    assert (len(names) - 1) / layers > LAUNCHES_PER_LAYER and "aten:mul" in names, names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_layer_kernels_on_cuda():
    """The kernels the GPU runs for one decode step of the 9B-shaped backbone (cuBLAS's own included)."""
    from torch.profiler import ProfilerActivity, profile
    engine = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float16, device="cuda",
                                scheduler=SCHED, cuda_graphs=False)
    params = SamplingParams.greedy(max_tokens=4, ignore_eos=True)
    engine.add_request(list(range(3, 93)), params)
    engine.step()
    backbone, layers = engine.runtime.backbone, engine.config.text.num_hidden_layers
    calls = []
    forward = backbone.forward

    def profiled(*args, **kwargs):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = forward(*args, **kwargs)
            torch.cuda.synchronize()
        calls.append([e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.name.startswith(("Memset", "Memcpy"))])
        return out
    backbone.forward = profiled
    engine.step()
    del backbone.forward
    kernels = calls[-1]
    assert (len(kernels) - 1) / layers <= LAUNCHES_PER_LAYER, kernels
