"""A tiny GLM-4.1V checkpoint directory as the released one is laid out, built offline for the tests:
transformers' own `Glm4vForConditionalGeneration.save_pretrained` (random weights), a tokenizer.json
whose special tokens sit at GLM's real ids (151329 <|endoftext|> ... 151343 <|image|>), the chat
template in tokenizer_config.json, generation_config.json's eos list and a preprocessor_config.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from autoglm_fast.families.glm4v.config import Glm4vConfig

GLM41V_SPECIALS = {
    "<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332, "<sop>": 151333,
    "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336, "<|assistant|>": 151337, "<|observation|>": 151338,
    "<|begin_of_image|>": 151339, "<|end_of_image|>": 151340, "<|begin_of_video|>": 151341,
    "<|end_of_video|>": 151342, "<|image|>": 151343, "<|video|>": 151344, "<think>": 151350, "</think>": 151351,
}
EOS = [151329, 151336, 151338]
TEXTS = ["hello world, hello phone", "open the settings app", "tap the search box and type weather",
         "do(action=\"Tap\", element=[500, 300])", "你好世界，打开微信"]


def glm41v_tokenizer():
    """Byte-level BPE trained on a few phrases, padded with unused tokens so GLM's specials land on their
    real ids (in the model vocabulary and as special added tokens, as GLM's tokenizer.json has them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    by_id = {i: s for s, i in GLM41V_SPECIALS.items()}
    for i in range(len(vocab), max(by_id) + 1):
        vocab[by_id.get(i, f"<|unused_{i}|>")] = i
    data["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for s, i in GLM41V_SPECIALS.items()]
    tok = Tokenizer.from_str(json.dumps(data))
    assert all(tok.token_to_id(s) == i for s, i in GLM41V_SPECIALS.items())
    return tok


def tiny_config() -> Glm4vConfig:
    """glm4v-tiny with GLM's real vocabulary size and special ids."""
    tiny = Glm4vConfig.preset("glm4v-tiny")
    return dataclasses.replace(Glm4vConfig(), text=dataclasses.replace(tiny.text, vocab_size=151552),
                               vision=tiny.vision, eos_token_ids=tuple(EOS), pad_token_id=151329)


def save_checkpoint(directory: Path, chat_template: str, seed: int = 0, config: Glm4vConfig | None = None):
    """Write the directory; returns transformers' model (eval, fp32) for comparisons."""
    import transformers
    config = config or tiny_config()
    hf_cfg = transformers.Glm4vConfig(**{k: v for k, v in config.to_hf().items()
                                         if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from 1 / 0; logits spread enough for clear argmaxes
            p.add_(torch.randn_like(p) * 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = 151329
    model.save_pretrained(directory)
    glm41v_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": chat_template, "clean_up_tokenization_spaces": False}, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Glm4vImageProcessor", "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "size": {"shortest_edge": 12544, "longest_edge": 200704},  # small images: few patches on a CPU
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return model


def randomize_vision(model: torch.nn.Module) -> None:
    """A vision tower's weights with O(1) activations, non-trivial norms and biases, and attention sharp
    enough that a leak between images (or a missing mask) shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "position_embedding" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, (3.0 if "qkv" in name else 1.0) / p[0].numel() ** 0.5)
