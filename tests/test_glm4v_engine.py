"""The engine on a transformers-saved GLM-4.1V directory: greedy tokens and logprobs equal transformers'
own `generate` (text only, one image, two images), batched and chunked alike."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from glm4v_checkpoint import save_checkpoint  # noqa: E402

from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig  # noqa: E402
from autoglm_fast.families.glm4v.image_processing import Glm4vImageProcessor  # noqa: E402

NEW = 6
LOGPROB_TOL = 2e-3  # the bound; fp32 runs agree to ~1e-5
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"  # token-id prompts here: not used


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm41v")
    return directory, save_checkpoint(directory, TEMPLATE)


def _images(*sizes):
    from PIL import Image
    gen = torch.Generator().manual_seed(len(sizes))
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for w, h in sizes]


def _prompt(directory, images):
    """Token ids as the processor would make them: text, each image's expanded run, text."""
    proc = Glm4vImageProcessor.load(directory)
    ids = [151331, 151333, 151336, 198, 300, 301]
    grids = proc.preprocess(images)[1] if images else []
    for g in grids:
        ids += [151339] + [151343] * proc.num_image_tokens(g) + [151340]
    return ids + [302, 303, 151337, 198]


def _hf_generate(hf, directory, ids, images):
    kw = {}
    if images:
        pv, grid = Glm4vImageProcessor.load(directory).preprocess(images)
        kw = dict(pixel_values=pv, image_grid_thw=grid)
    x = torch.tensor([ids])
    out = hf.generate(x, mm_token_type_ids=(x == 151343).int(), max_new_tokens=NEW, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, eos_token_id=None, **kw)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


CASES = {"text": [], "one image": [(112, 168)], "two images": [(168, 112), (112, 112)]}


@pytest.mark.parametrize("backend,graphs", [("reference", False), ("fast", False), ("fast", True)],
                         ids=["reference", "fast", "fast, graph buffers"])
def test_greedy_equals_transformers_generate(checkpoint, backend, graphs):
    """A mixed batch (text only, one image, two images) prefilled in 64-token chunks that split image runs;
    the fast backend's kernels (M-RoPE in the cache-write epilogue, paged attention) on CPU run in
    Triton's interpreter; "graph buffers" decodes through the CUDA-graph static buffers (eagerly on CPU)."""
    if backend == "fast":
        pytest.importorskip("triton")
        from autoglm_fast.kernels.utils import device_supported
        if not device_supported(torch.device("cpu")):
            pytest.skip("the kernels need CUDA, or TRITON_INTERPRET=1 on a CPU")
    directory, hf = checkpoint
    engine = Engine.from_pretrained(directory, backend=backend, dtype=torch.float32, device="cpu",
                                    cuda_graphs=graphs,
                                    scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                              max_model_len=512))
    params = SamplingParams.greedy(max_tokens=NEW, ignore_eos=True, logprobs=0)
    prompts = {name: (_prompt(directory, imgs := _images(*sizes)), imgs) for name, sizes in CASES.items()}
    ids = {name: engine.add_request(p, params, images=imgs) for name, (p, imgs) in prompts.items()}
    outs = {}
    while engine.has_unfinished():  # all three at once, prefilled in 64-token chunks (images split)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    for name, (p, imgs) in prompts.items():
        got = outs[ids[name]]
        tokens = [t for o in got for t in o.token_ids]
        logprobs = [lp["logprob"] for o in got for lp in (o.logprobs or [])]
        want_tokens, want_logprobs = _hf_generate(hf, directory, p, imgs)
        assert tokens == want_tokens, name
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < LOGPROB_TOL, name
        assert got[-1].prompt_tokens == len(p)
