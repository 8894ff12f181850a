"""The shipped, trained nano checkpoint (checkpoints/autoglm-phone-nano, issue #15): every part of the
model does its job on held-out examples, decoded for real through the engine."""
import json

import pytest
import torch

from autoglm_fast.engine import Engine, SamplingParams
from autoglm_fast.kernels.utils import interpreting
from autoglm_fast.tokenizer import HFTokenizer
from autoglm_fast.train import data
from autoglm_fast.train.eval import AUDIO_TASKS, VISION_TASKS, default_checkpoint, evaluate, heldout
from kernel_harness import DEVICE, requires_kernels

CKPT = default_checkpoint()
PER_TASK = 20
BAR = {"colour": 0.95, "shape": 0.95, "beeps": 0.90, "pitch": 0.90}  # the acceptance bar
CHANCE = {"colour": 1 / len(data.COLOURS), "shape": 1 / len(data.SHAPES), "position": 1 / len(data.POSITIONS)}


def load(backend="reference", device="cpu"):
    return Engine.from_pretrained(CKPT, backend=backend, device=device)


@pytest.fixture(scope="module")
def examples():
    return heldout(PER_TASK * 6, tasks=VISION_TASKS + AUDIO_TASKS + ("both",)) + heldout(8, tasks=("identity", "chat"))


@pytest.fixture(scope="module")
def reference(examples):
    return evaluate(load(), examples)


def test_checkpoint_is_small_and_loads_like_a_real_one():
    files = {p.name for p in CKPT.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", "training.json"} <= files
    assert sum(p.stat().st_size for p in CKPT.iterdir()) < 8 * 2**20
    engine = load()
    assert isinstance(engine.tokenizer, HFTokenizer)  # the trained BPE, not the byte fallback
    config = json.loads((CKPT / "config.json").read_text())
    assert engine.tokenizer.encode("<|image|>") == [config["image_token_id"]]
    ids = engine.tokenizer.encode(data.IDENTITY_ANSWER)
    assert len(ids) < len(data.IDENTITY_ANSWER.encode()) / 2  # merges, not bytes
    assert engine.tokenizer.decode(ids) == data.IDENTITY_ANSWER


def test_heldout_accuracy_meets_the_bar(reference):
    accuracy, _ = reference
    for task, bar in BAR.items():
        assert accuracy[task] >= bar, (task, accuracy)
    assert accuracy["position"] >= 0.9 and accuracy["both"] >= 0.9, accuracy


@pytest.mark.parametrize("thinking", [False, True])
def test_identity_answer(thinking):
    """The article's exchange: 你是谁？ -> the identity answer (after a reasoning block when thinking)."""
    out = load().generate([None], SamplingParams(max_tokens=64, temperature=0.0),
                          messages=[{"role": "user", "content": "你是谁？"}], enable_thinking=thinking)[0]
    assert out.finish_reason == "stop"
    # the prompt opened <think> when thinking (or wrote <think></think> when not): the reply continues it
    assert out.text == (f"{data.CHAT[0][1]}</think>\n" if thinking else "") + data.IDENTITY_ANSWER


@requires_kernels
def test_fast_backend_gives_the_reference_answers(examples, reference):
    """Same completions, token for token. In Triton's interpreter a few examples of each task (the whole
    set takes ~10 minutes there); on a GPU, all of them."""
    picked = range(len(examples)) if not interpreting() else [
        next(i for i, ex in enumerate(examples) if ex["task"] == task) for task in data.TASKS]
    _, completions = evaluate(load("fast", DEVICE), [examples[i] for i in picked])
    assert completions == [reference[1][i] for i in picked]


def test_zeroed_vision_gate_drops_vision_to_chance():
    """g_v = sigmoid(-1e4) = 0 at every text position: colour, shape and position fall to chance (on
    this set 27.5 %, 32.5 % and 2.5 %, chance 25 %, 33 %, 25 %) while audio stays perfect. The model
    was trained with most rows' spliced image tokens blanked (train.loss_fn image_token_dropout), so
    vision reaches the text through the gated fusion, not by attending to the image tokens."""
    engine = load()
    with torch.no_grad():
        engine.model.fusion.gate.weight[0].zero_()
        engine.model.fusion.gate.bias[0] = -1e4
    accuracy, _ = evaluate(engine, heldout(40 * 5, tasks=VISION_TASKS + AUDIO_TASKS))
    for task, chance in CHANCE.items():
        assert accuracy[task] <= chance + 0.15, (task, accuracy)
    for task in AUDIO_TASKS:
        assert accuracy[task] >= 0.9, (task, accuracy)
