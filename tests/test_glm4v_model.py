"""The whole GLM-4.1V reference loaded from a transformers-saved directory, against transformers itself;
the real preset's parameter counts; the family registry and `autoglm-fast info`."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autoglm_fast.cli import main  # noqa: E402
from autoglm_fast.families import family_for_checkpoint, family_for_preset  # noqa: E402
from autoglm_fast.families.glm4v.config import Glm4vConfig  # noqa: E402
from autoglm_fast.families.glm4v.model import Glm4vForConditionalGeneration, hf_name  # noqa: E402

TOL = 1e-4  # fp32 logits, max abs (logits ~ N(0, 1))
SPEC_COUNTS = {"language_model": 8_779_522_048, "lm_head": 620_756_992, "vision": 892_498_432,
               "total": 10_292_777_472}


def hf_config(cfg: Glm4vConfig):
    return transformers.Glm4vConfig(**{k: v for k, v in cfg.to_hf().items()
                                       if k not in ("architectures", "model_type")})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Glm4vForConditionalGeneration saved by transformers, and the model it came from."""
    cfg = Glm4vConfig.preset("glm4v-tiny")
    torch.manual_seed(0)
    hf = transformers.Glm4vForConditionalGeneration(hf_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms and biases away from 1 / 0: a skipped one shows
            p.add_(torch.randn_like(p) * 0.05)
    directory = tmp_path_factory.mktemp("glm4v-tiny")
    hf.save_pretrained(directory)
    return directory, hf, cfg


def _prompt(cfg: Glm4vConfig, grids: list[tuple[int, int, int]]):
    """Text, then each image's placeholder run between begin/end tokens, then more text."""
    ids = [5, 6, 7]
    for t, h, w in grids:
        ids += [cfg.image_start_token_id] + [cfg.image_token_id] * (t * h * w // cfg.merge_unit) + \
               [cfg.image_end_token_id, 9]
    ids += [10, 11, 12, 13]
    pixels = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(pixels, cfg.vision.patch_dim) if grids else None
    grid = torch.tensor(grids) if grids else None
    return torch.tensor([ids]), pixel_values, grid


@pytest.mark.parametrize("grids", [[], [(1, 4, 6)], [(1, 4, 6), (1, 6, 2)]], ids=["text", "one image", "two images"])
def test_logits_match_transformers(checkpoint, grids):
    directory, hf, cfg = checkpoint
    ours = Glm4vForConditionalGeneration.from_pretrained(directory)
    torch.manual_seed(1)
    ids, pixel_values, grid = _prompt(cfg, grids)
    with torch.no_grad():
        # mm_token_type_ids: what transformers' processor returns beside input_ids (1 = image token)
        want = hf(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid,
                  mm_token_type_ids=(ids == cfg.image_token_id).int()).logits
        got = ours(ids, pixel_values, grid)
    assert got.shape == want.shape
    assert (got - want).abs().max() < TOL
    assert (got * 1.01 - want).abs().max() > TOL  # the tolerance has teeth
    if grids:  # and the images really reach the logits
        with torch.no_grad():
            blank = ours(ids, torch.zeros_like(pixel_values), grid)
        assert (blank - want).abs().max() > 100 * TOL


def test_old_checkpoint_names_map_in():
    assert hf_name("model.layers.0.mlp.down_proj.weight") == "model.language_model.layers.0.mlp.down_proj.weight"
    assert hf_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert hf_name("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert hf_name("model.visual.merger.proj.weight") == "model.visual.merger.proj.weight"
    assert hf_name("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert hf_name("lm_head.weight") == "lm_head.weight"
    assert hf_name("model.language_model.rotary_emb.inv_freq") is None


def test_real_preset_counts_match_transformers_on_meta():
    with torch.device("meta"):
        counts = Glm4vForConditionalGeneration(Glm4vConfig.preset("glm-4.1v-9b")).parameter_counts()
        hf = transformers.Glm4vForConditionalGeneration(hf_config(Glm4vConfig.preset("glm-4.1v-9b")))
    assert counts == SPEC_COUNTS
    assert sum(p.numel() for p in hf.parameters()) == SPEC_COUNTS["total"]


def test_family_registry_and_info(checkpoint, capsys):
    directory, _, _ = checkpoint
    assert family_for_checkpoint(directory).name == "glm4v"
    assert family_for_preset("glm-4.1v-9b").name == "glm4v" and family_for_preset("nano").name == "autoglm-phone"
    assert main(["info", "--preset", "glm-4.1v-9b"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "glm4v" and info["parameters"] == SPEC_COUNTS
    assert main(["info", "--model", str(directory)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "glm4v" and info["config"]["text"]["mrope_section"] == [2, 1, 1]


def test_unknown_architectures_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*not supported"):
        family_for_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        family_for_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown preset"):
        family_for_preset("gpt-5")
