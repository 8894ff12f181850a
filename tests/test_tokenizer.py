import dataclasses
import json
import random

import pytest

from autoglm_fast.chat import render_chat
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.tokenizer import (GLM4_IDS, SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, IncrementalDetokenizer,
                                    TokenizerNotFoundError, load_tokenizer)
from helpers import GLM_TEXT_SPECIALS, glm_test_tokenizer

TEXTS = ["hello world", "你是谁？", "I'm fine 👍🏽, 谢谢! 🚀", "ünïcödé ✓ \n\t", ""]
HF_SPECIALS = [n for n in SPECIAL_TOKENS if n not in ("<|begin_of_audio|>", "<|end_of_audio|>", "<|audio|>",
                                                      "<|pad|>")]


def write_tokenizer_json(tmp_path, specials=HF_SPECIALS):
    """A tiny byte-level BPE trained here (no download), saved as tmp_path/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials))
    tok.train_from_iterator(["hello world, hello phone", "你好世界，你是谁？我是一个手机助手。",
                             "the quick brown fox jumps over the lazy dog", "I'm fine, 谢谢! 👍"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def make_hf(tmp_path, specials=HF_SPECIALS):
    """The trained tokenizer as an HFTokenizer, with a config whose media/eos ids match it and whose
    audio ids are free in it (so they take the config fallback)."""
    tok = write_tokenizer_json(tmp_path, specials)
    n, ids = tok.get_vocab_size(), {s: tok.token_to_id(s) for s in specials}
    config = dataclasses.replace(
        AutoGLMPhoneConfig.preset("nano"), text=dataclasses.replace(AutoGLMPhoneConfig.preset("nano").text,
                                                                    vocab_size=512),
        image_token_id=ids["<|image|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], audio_token_id=n, audio_start_token_id=n + 1,
        audio_end_token_id=n + 2, eos_token_ids=(ids["<|endoftext|>"],), pad_token_id=ids["<|endoftext|>"])
    return HFTokenizer(tmp_path, config), config


def stream(tokenizer, ids, skip):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


# ---- byte tokenizer -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(nano_config, text):
    tok = ByteTokenizer(nano_config)
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


def test_byte_specials_encode_and_decode(nano_config):
    tok = ByteTokenizer(nano_config)
    ids = tok.encode("<|user|>\n你好<|endoftext|>")
    assert ids == [tok.special_ids["<|user|>"], *"\n你好".encode(), 290]
    assert tok.decode(ids) == "<|user|>\n你好<|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "\n你好"
    assert tok.encode("<|user|>", allow_special=False) == list(b"<|user|>")
    assert tok.encode("<think></think>") == [262, 263]  # longest match, not "<think>" inside "</think>"
    assert tok.token_to_id("<|image|>") == 291 and tok.id_to_token(291) == "<|image|>"
    assert tok.token_to_id("a") == 97 and tok.id_to_token(0xE4) == "<0xE4>" and tok.token_to_id("<0xE4>") == 0xE4
    # ids no special token claims still decode (a random-weight model samples them)
    assert tok.id_to_token(270) == "<|reserved_270|>" and tok.token_to_id("<|reserved_270|>") == 270
    assert tok.decode([104, 270, 105]) == "h<|reserved_270|>i" and tok.decode([104, 270], True) == "h"
    with pytest.raises(ValueError, match="unknown token"):
        tok.token_to_id("<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])


def test_byte_ids_nano(nano_config):
    tok = ByteTokenizer(nano_config)
    assert tok.vocab_size == 300 and tok.eos_token_ids == (290,)
    assert tok.special_ids == {
        "[gMASK]": 256, "<sop>": 257, "<|system|>": 258, "<|user|>": 259, "<|assistant|>": 260,
        "<|observation|>": 261, "<|endoftext|>": 290, "<think>": 262, "</think>": 263,
        "<|begin_of_image|>": 292, "<|end_of_image|>": 293, "<|image|>": 291, "<|begin_of_audio|>": 295,
        "<|end_of_audio|>": 296, "<|audio|>": 294, "<|pad|>": 299}


def test_byte_ids_9b():
    config = AutoGLMPhoneConfig.preset("autoglm-phone-9b")
    tok = ByteTokenizer(config)
    assert {n: tok.special_ids[n] for n in GLM4_IDS} == GLM4_IDS
    assert tok.special_ids["<|endoftext|>"] == 151329 and tok.special_ids["<|image|>"] == 151363
    assert tok.eos_token_ids == (151329, 151336, 151338)
    assert tok.id_to_token(151329) == "<|endoftext|>"  # pad shares the id; the eos name wins
    assert tok.decode(list(config.eos_token_ids)) == "<|endoftext|><|user|><|observation|>"


@pytest.mark.parametrize("preset", ["nano", "autoglm-phone-9b"])
def test_byte_ids_do_not_collide(preset):
    config = AutoGLMPhoneConfig.preset(preset)
    ids = ByteTokenizer(config).special_ids
    distinct = {n: i for n, i in ids.items() if n != "<|pad|>"}
    assert len(set(distinct.values())) == len(distinct) == len(SPECIAL_TOKENS) - 1
    assert all(256 <= i < config.text.vocab_size for i in ids.values())
    assert ids["<|pad|>"] == config.pad_token_id


def test_byte_vocab_too_small():
    base = AutoGLMPhoneConfig.preset("nano")
    small = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=270),
                                image_token_id=260, image_start_token_id=261, image_end_token_id=262,
                                audio_token_id=263, audio_start_token_id=264, audio_end_token_id=265,
                                eos_token_ids=(266,), pad_token_id=267)
    with pytest.raises(ValueError, match="too small"):
        ByteTokenizer(small)
    with pytest.raises(ValueError, match="collide"):
        ByteTokenizer(dataclasses.replace(base, image_token_id=65))


# ---- incremental detokenization ---------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_byte_incremental_matches_full_decode(nano_config, skip):
    tok = ByteTokenizer(nano_config)
    for text in TEXTS + ["<think>想一想</think>\n答案 🦊<|endoftext|>"]:
        ids = tok.encode(text)
        deltas, tail = stream(tok, ids, skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas)  # never half a character
    rng = random.Random(0)  # arbitrary ids, invalid UTF-8 included
    for _ in range(50):
        ids = [rng.choice([rng.randrange(128), rng.randrange(128, 256), rng.randrange(256, 300)])
               for _ in range(rng.randrange(1, 30))]
        deltas, tail = stream(tok, ids, skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


def test_byte_incremental_holds_and_flushes(nano_config):
    tok = ByteTokenizer(nano_config)
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(b) for b in "你".encode()] == ["", "", "你"]
    assert detok.push(0xE4) == "" and detok.flush() == "\ufffd"  # truncated character at the end


# ---- Hugging Face tokenizer --------------------------------------------------------------------
def test_hf_round_trip_and_specials(tmp_path):
    tok, config = make_hf(tmp_path)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert all(tok.special_ids[n] == tok.token_to_id(n) for n in HF_SPECIALS)
    user = tok.special_ids["<|user|>"]
    ids = tok.encode("<|user|>\n你是谁？")
    assert ids[0] == user and tok.decode(ids, skip_special_tokens=True) == "\n你是谁？"
    assert user not in tok.encode("<|user|>", allow_special=False)
    assert tok.decode(tok.encode("<|user|>", allow_special=False)) == "<|user|>"
    assert tok.eos_token_ids == config.eos_token_ids
    # audio tokens the file lacks take the config's ids, and are encoded/decoded here
    audio = config.audio_token_id
    assert tok.special_ids["<|audio|>"] == audio and tok.id_to_token(audio) == "<|audio|>"
    ids = tok.encode("a<|audio|>b")
    assert audio in ids and tok.decode(ids) == "a<|audio|>b" and tok.decode(ids, True) == "ab"
    assert tok.special_ids["<|pad|>"] == tok.special_ids["<|endoftext|>"]
    with pytest.raises(ValueError, match="unknown token"):
        tok.token_to_id("<|nope|>")


def test_hf_without_config_uses_glm_stop_set(tmp_path):
    make_hf(tmp_path)
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_token_ids == tuple(tok.token_to_id(n) for n in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert "<|audio|>" not in tok.special_ids


def test_hf_errors(tmp_path):
    write_tokenizer_json(tmp_path, [n for n in HF_SPECIALS if n not in ("<sop>", "<|image|>")])
    with pytest.raises(ValueError, match=r"lacks the special tokens \['<sop>', '<\|image\|>'\]"):
        HFTokenizer(tmp_path)
    (tmp_path / "b").mkdir()
    _, config = make_hf(tmp_path / "b")
    with pytest.raises(ValueError, match="model config says"):
        HFTokenizer(tmp_path / "b", dataclasses.replace(config, image_token_id=config.image_token_id + 1))
    with pytest.raises(FileNotFoundError):
        HFTokenizer(tmp_path / "missing")


@pytest.mark.parametrize("skip", [True, False])
def test_hf_incremental_matches_full_decode(tmp_path, skip):
    tok, _ = make_hf(tmp_path)
    # 🚀 and ✓ are unseen in training, so they arrive as byte tokens that split the characters
    assert any(tok.decode([i]) == "\ufffd" for i in tok.encode("🚀"))
    for text in TEXTS + ["<think>想一想</think>\n答案 🚀<|audio|><|endoftext|>"]:
        ids = tok.encode(text)
        deltas, tail = stream(tok, ids, skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas)


def test_a_directory_without_a_tokenizer_is_an_error_not_bytes(tmp_path, nano_config):
    (tmp_path / "config.json").write_text("{}")  # a checkpoint-looking directory, no tokenizer.json
    with pytest.raises(TokenizerNotFoundError, match="--tokenizer bytes") as e:
        load_tokenizer(tmp_path, nano_config)
    assert f"{tmp_path}: no tokenizer.json. Put the model's tokenizer.json" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI reports ValueErrors with exit code 2
    with pytest.raises(TokenizerNotFoundError, match="tokenizer='bytes'"):
        load_tokenizer(None, nano_config)
    with pytest.raises(TokenizerNotFoundError, match="missing: no such tokenizer file"):
        load_tokenizer(tmp_path, nano_config, tmp_path / "missing")
    assert isinstance(load_tokenizer(tmp_path, nano_config, "bytes"), ByteTokenizer)  # asked for by name


def test_load_tokenizer_reads_the_file_or_the_named_one(tmp_path, nano_config):
    _, config = make_hf(tmp_path)
    assert isinstance(load_tokenizer(tmp_path, config), HFTokenizer)
    for named in (tmp_path, tmp_path / "tokenizer.json"):  # --tokenizer PATH wins over model_dir
        assert isinstance(load_tokenizer(tmp_path / "elsewhere", config, named), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path, nano_config, "bytes"), ByteTokenizer)


def test_special_ids_are_the_tokenizers_added_tokens(tmp_path):
    """GLM's special tokens appended out of GLM's order: every id is read from the file, none assumed."""
    hf, config = glm_test_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, config)
    assert tok.special_ids["<|image|>"] == hf.token_to_id("<|image|>") == 300 != 151343
    assert all(tok.special_ids[n] == hf.token_to_id(n) for n in GLM_TEXT_SPECIALS)
    assert "[gMASK]<sop>" in tok.decode(render_chat([{"role": "user", "content": "hi"}], tok, config).token_ids)
    glm41v = dataclasses.replace(config, image_token_id=151343, text=dataclasses.replace(config.text,
                                                                                         vocab_size=151552))
    with pytest.raises(ValueError, match=r"<\|image\|> is id 300 but the model config says 151343"):
        load_tokenizer(tmp_path, glm41v)


def test_save_then_load_gives_the_same_tokenizer(tmp_path, nano_config):
    hf, config = glm_test_tokenizer(tmp_path / "src")
    (tmp_path / "src" / "chat_template.jinja").write_text("{{ messages }}")
    tok = load_tokenizer(tmp_path / "src", config)
    tok.save(tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                              "chat_template.jinja"}
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    again = load_tokenizer(tmp_path / "hf", config)
    text = "<|user|>\n你好 hello<|image|><|audio|>"
    assert isinstance(again, HFTokenizer) and again.special_ids == tok.special_ids
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
    # the byte tokenizer saves a marker that loads back without being asked for; it replaces stale files
    ByteTokenizer(nano_config).save(tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["tokenizer_config.json"]
    back = load_tokenizer(tmp_path / "hf", nano_config)
    assert isinstance(back, ByteTokenizer) and back.special_ids == ByteTokenizer(nano_config).special_ids


def test_hf_without_think_tags_renders_them_as_text(tmp_path):
    tok, config = make_hf(tmp_path, [n for n in HF_SPECIALS if n not in ("<think>", "</think>")])
    assert "<think>" not in tok.special_ids
    prompt = render_chat([{"role": "user", "content": "hi"}], tok, config, enable_thinking=False)
    assert tok.decode(prompt.token_ids) == "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think></think>\n"


def test_hf_skipping_specials_keeps_think_tags(tmp_path):
    """The file marks every GLM token special (as the nano checkpoint's does); skipping specials still
    renders the think tags, which the server splits reasoning on, and drops the rest."""
    tok, _ = make_hf(tmp_path)
    ids = tok.encode("<|assistant|><think>why</think>\nanswer<|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>why</think>\nanswer"
    deltas, tail = stream(tok, ids, skip=True)
    assert "".join(deltas) + tail == "<think>why</think>\nanswer"
    assert tok.decode(ids) == "<|assistant|><think>why</think>\nanswer<|endoftext|>"
