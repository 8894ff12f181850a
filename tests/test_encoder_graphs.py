"""Encoders at padded static shapes (engine/encoder_graphs.py): padding never changes a real output,
a replayed graph reads each call's inputs, and the engine routes the towers through it."""
import pytest
import torch

from agreement import assert_close_across_shapes
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.engine.encoder_graphs import EncoderGraphs, patch_bucket
from autoglm_fast.families.glm4v.config import Glm4vConfig
from autoglm_fast.families.glm4v.model import Glm4vForConditionalGeneration
from autoglm_fast.families.glm4v.vision import vision_cu_seqlens
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM


def _stand_in_capture(graphs, monkeypatch):
    """Capture as on CUDA, with a graph whose replay recomputes from the static inputs."""
    graphs.capture = True

    def capture(key, fn, inputs):
        static = [x.clone() for x in inputs]
        out = fn(*static)
        graphs.graphs[key] = (type("Graph", (), {"replay": lambda self: out.copy_(fn(*static))})(), static, out)

    monkeypatch.setattr(graphs, "_capture", capture)


def test_buckets():
    assert [patch_bucket(n) for n in (1, 16, 17, 1000, 1025, 12432)] == [16, 16, 32, 1024, 2048, 13312]


@torch.no_grad()
@pytest.mark.parametrize("replayed", [False, True], ids=["eager", "replayed"])
def test_a_padded_image_batch_gives_each_image_its_own_features(replayed, monkeypatch):
    model = AutoGLMPhoneForCausalLM.from_config(AutoGLMPhoneConfig.preset("nano"), seed=0).eval()
    tower, graphs = model.vision_tower, EncoderGraphs(capture=False)
    if replayed:
        _stand_in_capture(graphs, monkeypatch)
    run = graphs.batched("clip", tower.forward)
    s = model.config.vision.image_size
    for n in (3, 4):  # both pad to the bucket of 4: the second call replays the first one's graph
        x = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(n))
        assert_close_across_shapes(run(x), tower(x))
    assert len(graphs.graphs) == (1 if replayed else 0) and graphs.replays == (2 if replayed else 0)


@torch.no_grad()
@pytest.mark.parametrize("replayed", [False, True], ids=["eager", "replayed"])
def test_padded_patches_and_segments_leave_the_images_alone(replayed, monkeypatch):
    model = Glm4vForConditionalGeneration.from_config(Glm4vConfig.preset("glm4v-tiny"), seed=0).eval()
    visual, graphs = model.model.visual, EncoderGraphs(capture=False)
    if replayed:
        _stand_in_capture(graphs, monkeypatch)
    run = graphs.packed_segments("vision", visual.run_blocks)
    gen = torch.Generator().manual_seed(0)
    for grids in ([[1, 8, 12], [1, 4, 4]], [[1, 8, 8], [1, 8, 6]]):  # 112 patches each: one graph, replayed
        grid = torch.tensor(grids)
        n, d = int(grid.prod(-1).sum()), visual.config.hidden_size
        x = torch.randn(n, d, generator=gen)
        cos, sin = visual.vision_rotary(grid)
        cu = vision_cu_seqlens(grid)
        assert_close_across_shapes(run(x, cos, sin, cu), visual.run_blocks(x, cos, sin, cu))
    assert len(graphs.graphs) == (1 if replayed else 0)


def test_the_engine_routes_both_families_encoders_through_the_graphs():
    from autoglm_fast.engine import Engine
    nano = Engine.from_preset("nano", backend="reference", cuda_graphs=True)
    assert nano.encoder_graphs is None  # graphs are the fast backend's
    for preset, wrapped in (("nano", ("vision_tower", "audio_tower")), ("glm4v-tiny", ("model.visual",))):
        engine = Engine.from_preset(preset, backend="fast", cuda_graphs=True) if _kernels() else None
        if engine is None:
            pytest.skip("the fast backend needs a GPU or TRITON_INTERPRET=1")
        for name in wrapped:
            module = engine.model.get_submodule(name)
            attr = "run_blocks" if preset == "glm4v-tiny" else "forward"
            assert getattr(module, attr).__qualname__.startswith("EncoderGraphs."), name


def _kernels() -> bool:
    from kernel_harness import DEVICE
    from autoglm_fast.kernels.utils import device_supported
    return device_supported(torch.device(DEVICE))


@pytest.mark.gpu
def test_encoders_are_captured_and_replayed_on_cuda():
    """The production setup: a capture that falls back (a host sync in a tower, say) fails here."""
    pytest.importorskip("PIL")
    from autoglm_fast.demo import demo_image, demo_tone
    from autoglm_fast.engine import Engine, SamplingParams
    for preset in ("nano", "glm4v-tiny"):
        engine = Engine.from_preset(preset, seed=0, backend="fast")
        media = {"images": [demo_image(56)]}
        if preset == "nano":
            media["audio"] = [demo_tone(engine.config, seconds=0.5)]
        for _ in range(2):
            (out,) = engine.generate(["hi"], SamplingParams.greedy(max_tokens=2), **media)
            assert out.error is None and len(out.token_ids) == 2
        graphs = engine.encoder_graphs
        assert graphs.failure is None and graphs.capture and graphs.replays >= 2 and graphs.graphs, preset
