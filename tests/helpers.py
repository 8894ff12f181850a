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
