"""A small byte-level BPE for the nano model, with GLM's special tokens, and the config that matches it.

The shipped nano checkpoint loads through `HFTokenizer` like a real checkpoint (tokenizer.json +
config.json whose special ids agree), so the demo exercises the same path. Byte level: any text,
Chinese included, encodes (unseen characters fall back to bytes) and decodes back exactly.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import AutoGLMPhoneConfig
from ..tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE

VOCAB_MULTIPLE = 64  # the model's vocabulary is padded to this (the ids past the file's are never produced)


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """BPE merges learnt from `texts` up to `vocab_size` (256 byte symbols + merges), then every
    special token of `tokenizer.SPECIAL_TOKENS` appended as an added token (ids vocab.. in order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / TOKENIZER_FILE))
    return directory / TOKENIZER_FILE


def nano_config_for(tok, base: AutoGLMPhoneConfig | None = None) -> AutoGLMPhoneConfig:
    """`base` (the nano preset by default) with the vocabulary and every special id taken from `tok`;
    eos is GLM's stop set (<|endoftext|>, <|user|>, <|observation|>)."""
    base = base or AutoGLMPhoneConfig.preset("nano")
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    n = tok.get_vocab_size(with_added_tokens=True)
    vocab = -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return dataclasses.replace(
        base, text=dataclasses.replace(base.text, vocab_size=vocab),
        image_token_id=ids["<|image|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], audio_token_id=ids["<|audio|>"],
        audio_start_token_id=ids["<|begin_of_audio|>"], audio_end_token_id=ids["<|end_of_audio|>"],
        eos_token_ids=(ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]),
        pad_token_id=ids["<|pad|>"])


def build_nano_tokenizer(directory: str | Path, texts: list[str] | None = None, vocab_size: int = 512):
    """Train on `texts` (default: every string the synthetic tasks produce), save to `directory`, and
    load it back the way a checkpoint's is loaded. Returns (HFTokenizer, matching nano config)."""
    from ..tokenizer import HFTokenizer
    from .data import training_texts
    tok = train_tokenizer(training_texts() if texts is None else texts, vocab_size)
    config = nano_config_for(tok)
    return HFTokenizer(save_tokenizer(tok, directory).parent, config), config
