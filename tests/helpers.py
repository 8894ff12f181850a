"""Shared test inputs: a nano-preset prompt with media, and its logits."""
import torch

from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.demo import build_prompt
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM

AUDIO_SAMPLES = 16000  # 1 s -> 50 encoder frames -> 13 audio tokens on nano


def media_inputs(config: AutoGLMPhoneConfig, seed: int = 0):
    """ids with exactly the image and audio placeholder counts the media need, plus random media."""
    g = torch.Generator().manual_seed(seed)
    c = config
    text = torch.randint(0, 256, (12,), generator=g).tolist()
    ids = build_prompt(c, text, c.audio.num_tokens(AUDIO_SAMPLES))
    s = c.vision.image_size
    pixel_values = torch.randn(1, c.vision.num_channels, s, s, generator=g)
    input_features = torch.randn(1, c.audio.num_mel_bins, 2 * c.audio.max_source_positions, generator=g)
    return torch.tensor([ids]), pixel_values, input_features


@torch.no_grad()
def media_logits(model: AutoGLMPhoneForCausalLM, seed: int = 0) -> torch.Tensor:
    ids, px, feats = media_inputs(model.config, seed)
    dtype = model.lm_head.weight.dtype
    return model(ids, pixel_values=px.to(dtype), input_features=feats.to(dtype),
                 audio_num_samples=[AUDIO_SAMPLES]).logits


GLM_TEXT_SPECIALS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                     "<|endoftext|>", "<think>", "</think>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>")


def glm_test_tokenizer(directory, vocab_size: int = 512):
    """A tiny byte-level BPE trained here (no download) with GLM's special tokens appended as added
    tokens in reverse order, so none sits at its GLM id (<|image|> is near the start of the block, not
    GLM-4.1V's 151343); saved as directory/tokenizer.json. Returns it and the nano config with
    `vocab_size` whose media/eos ids are that tokenizer's (audio ids: free ids after it)."""
    import dataclasses

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, hello phone", "你好世界，你是谁？", "the quick brown fox"], trainer)
    tok.add_special_tokens(list(reversed(GLM_TEXT_SPECIALS)))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    ids, n = {s: tok.token_to_id(s) for s in GLM_TEXT_SPECIALS}, tok.get_vocab_size()
    base = AutoGLMPhoneConfig.preset("nano")
    config = dataclasses.replace(
        base, text=dataclasses.replace(base.text, vocab_size=vocab_size),
        image_token_id=ids["<|image|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], audio_token_id=n, audio_start_token_id=n + 1,
        audio_end_token_id=n + 2, eos_token_ids=(ids["<|endoftext|>"], ids["<|user|>"]),
        pad_token_id=ids["<|endoftext|>"])
    return tok, config
