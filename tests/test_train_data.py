"""The nano model's synthetic tasks (autoglm_fast/train): seeded, split-disjoint, and answers that
follow from the generated media; the BPE tokenizer loads as a checkpoint's would and round-trips."""
import hashlib

import numpy as np
import pytest

from autoglm_fast.chat import render_chat
from autoglm_fast.tokenizer import SPECIAL_TOKENS, HFTokenizer
from autoglm_fast.train import data
from autoglm_fast.train.tokenizer import nano_config_for, save_tokenizer, train_tokenizer


def _fingerprint(ex):
    h = hashlib.sha256(f"{ex['task']}|{ex['answer']}|{ex['enable_thinking']}".encode())
    for part in ex["messages"][0]["content"] if isinstance(ex["messages"][0]["content"], list) else []:
        if part["type"] == "image":
            h.update(part["image"].tobytes())
        elif part["type"] == "audio":
            h.update(part["audio"].tobytes())
        else:
            h.update(part["text"].encode())
    return h.hexdigest()


def _media(ex, kind):
    return [p[kind] for p in ex["messages"][0]["content"] if isinstance(p, dict) and p["type"] == kind]


def _names(word):
    return {word, data.ZH[word]}


def test_examples_are_seeded():
    a = [_fingerprint(e) for e in data.examples("train", 24, seed=3)]
    assert a == [_fingerprint(e) for e in data.examples("train", 24, seed=3)]
    assert a != [_fingerprint(e) for e in data.examples("train", 24, seed=4)]


def test_heldout_media_disjoint_from_train():
    def media_keys(split):
        return {_fingerprint(e) for e in data.examples(split, 96, seed=0) if e["task"] not in ("identity", "chat")}
    train, held = media_keys("train"), media_keys("heldout")
    assert len(train) == len(held) == 72 and not train & held


def test_every_task_present():
    exs = list(data.examples("train", len(data.TASKS), seed=0))
    assert [e["task"] for e in exs] == list(data.TASKS)
    assert any(e["enable_thinking"] for e in data.examples("train", 64, 0) if e["task"] in ("identity", "chat"))
    identity = next(e for e in exs if e["task"] == "identity")
    assert identity["messages"][0]["content"] == "你是谁？" and identity["answer"].startswith("我是AutoGLM-Phone-9B")


def _image_truth(img):
    """(colour, position, shape) read back from the pixels."""
    arr = np.asarray(img).astype(int)
    fg = np.abs(arr - np.array(data.BACKGROUND)).sum(-1) > 60
    palette = {name: np.array(rgb) for name, rgb in data.COLOURS.items()}
    nearest = [min(palette, key=lambda n: np.abs(px - palette[n]).sum()) for px in arr[fg]]
    colour = max(set(nearest), key=nearest.count)
    ys, xs = np.nonzero(fg)
    cx, cy, size = xs.mean() / arr.shape[1], ys.mean() / arr.shape[0], arr.shape[0]
    position = min(data.POSITIONS, key=lambda p: (data.POSITIONS[p][0] - cx) ** 2 + (data.POSITIONS[p][1] - cy) ** 2)
    fill = fg.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))  # 1 square, pi/4 circle, 1/2 triangle
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    assert size == data.IMAGE_SIZE
    return colour, position, shape


def _audio_truth(wave):
    """(bursts of energy in 10 ms frames, dominant frequency in Hz)."""
    frames = wave[: len(wave) // 160 * 160].reshape(-1, 160)
    loud = np.sqrt((frames ** 2).mean(1)) > 0.05
    bursts = int(loud[0]) + int((loud[1:] & ~loud[:-1]).sum())
    spectrum = np.abs(np.fft.rfft(wave))
    return bursts, np.fft.rfftfreq(len(wave), 1 / data.SAMPLE_RATE)[spectrum.argmax()]


def test_answers_follow_from_the_media():
    for ex in data.examples("heldout", 120, seed=1):
        task, truth, answer = ex["task"], ex["truth"], ex["answer"]
        for img in _media(ex, "image"):
            assert _image_truth(img) == (truth["colour"], truth["position"], truth["shape"])
        for wave in _media(ex, "audio"):
            assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == data.CLIP_SECONDS * data.SAMPLE_RATE
            bursts, hz = _audio_truth(wave)
            assert bursts == truth["count"] and (hz > 800) == (truth["pitch"] == "high")
        if task in ("colour", "shape", "position", "pitch"):
            key = {"colour": "colour", "shape": "shape", "position": "position", "pitch": "pitch"}[task]
            assert answer in _names(truth[key])
        elif task == "beeps":
            assert answer == str(truth["count"])
        elif task == "both":
            assert answer in {f"{truth['colour']}, {truth['count']}", f"{data.ZH[truth['colour']]}，{truth['count']}"}


def test_make_tones_rejects_bad_counts():
    with pytest.raises(ValueError):
        data.make_tones(0, "low", np.random.default_rng(0))


@pytest.fixture(scope="module")
def nano_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nano_tok")
    tok = train_tokenizer(data.training_texts(), 512)
    save_tokenizer(tok, directory)
    config = nano_config_for(tok)
    return HFTokenizer(directory, config), config, tok


def test_tokenizer_agrees_with_config(nano_tokenizer):
    hf, config, raw = nano_tokenizer
    assert raw.get_vocab_size() <= config.text.vocab_size and config.text.vocab_size % 64 == 0
    assert all(hf.special_ids[name] == i for name, i in config.special_token_ids().items())
    assert set(hf.special_ids) == set(SPECIAL_TOKENS)
    assert config.eos_token_ids[0] == hf.special_ids["<|endoftext|>"]


def test_tokenizer_round_trips_chat(nano_tokenizer):
    hf, config, _ = nano_tokenizer
    for text in data.training_texts() + ["没见过的字：鲸 and unseen words"]:
        assert hf.decode(hf.encode(text, allow_special=False)) == text
    assert len(hf.encode(data.IDENTITY_ANSWER)) < len(data.IDENTITY_ANSWER)  # merges, not bytes
    counts = {"image": config.vision.num_tokens}
    for ex in data.examples("train", 16, seed=0):
        audio = _media(ex, "audio")
        counts["audio"] = config.audio.num_tokens(len(audio[0])) if audio else None
        prompt = render_chat(ex["messages"], hf, config, enable_thinking=ex["enable_thinking"],
                             media_tokens=lambda part: counts[part["type"]])
        ids = prompt.token_ids
        assert ids.count(config.image_token_id) == len(_media(ex, "image")) * config.vision.num_tokens
        assert ids.count(config.audio_token_id) == (counts["audio"] or 0) * len(audio)
        text = hf.decode(ids)
        question = ex["messages"][0]["content"]
        question = question if isinstance(question, str) else question[-1]["text"]
        assert question in text and text.endswith("<think>" if ex["enable_thinking"] else "<think></think>\n")
        target = data.target_text(ex)
        assert hf.decode(hf.encode(target)) == target
