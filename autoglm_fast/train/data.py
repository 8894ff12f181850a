"""Seeded synthetic multimodal tasks for the nano AutoGLM-Phone (issue #15).

Every example is OpenAI-shaped chat messages (media parts as the engine takes them) plus a short,
deterministic answer, so that each part of the model has something only it can solve:
vision (colour / shape / position), audio (beep count / pitch), both together, and text (identity
and a few chat turns, with or without a `<think>` block). Sizes follow the nano preset: images are
drawn at the vision tower's own size (42 px = 3x3 patches of 14) so preprocessing does not resample
them, and a shape sits centred on the edge-middle patch that names its position; clips are 1.5 s
(inside nano's 2 s Whisper window).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.5
IMAGE_SIZE = 42  # AutoGLMPhoneConfig.preset("nano").vision.image_size
BACKGROUND = (124, 117, 104)  # CLIP's pixel mean: normalises to ~0, so only the shape drives the patch embeddings
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
# Centre of each position as a fraction of the side: the middle of an edge patch of the 3x3 grid.
POSITIONS = {"left": (1 / 6, 1 / 2), "right": (5 / 6, 1 / 2), "top": (1 / 2, 1 / 6), "bottom": (1 / 2, 5 / 6)}
PITCHES = {"low": (220.0, 400.0), "high": (1200.0, 2000.0)}  # Hz ranges, far apart on the mel scale
MAX_BEEPS = 4
TASKS = ("colour", "shape", "position", "beeps", "pitch", "both", "identity", "chat")
SPLITS = ("train", "heldout")  # index = the split's seed stream: the streams never share a state

ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "circle": "圆形", "square": "正方形",
      "triangle": "三角形", "left": "左边", "right": "右边", "top": "上边", "bottom": "下边", "high": "高", "low": "低"}
QUESTIONS = {
    "colour": {"en": ["What colour is the shape?", "Which colour is it?"], "zh": ["图形是什么颜色？", "它是什么颜色的？"]},
    "shape": {"en": ["What shape is it?", "Which shape is in the picture?"], "zh": ["这是什么形状？", "图中是什么图形？"]},
    "position": {"en": ["Where is it?", "Where is the shape?"], "zh": ["它在哪里？", "图形在什么位置？"]},
    "beeps": {"en": ["How many beeps?", "How many beeps do you hear?"], "zh": ["有几声哔？", "你听到几声哔？"]},
    "pitch": {"en": ["Is the tone high or low?", "High or low tone?"], "zh": ["这个音是高还是低？", "音调高还是低？"]},
    "both": {"en": ["What colour is the shape, and how many beeps?"], "zh": ["图形是什么颜色，有几声哔？"]},
}
IDENTITY_ANSWER = "我是AutoGLM-Phone-9B，一个专为移动端优化的多模态大语言模型。"
# (user, reasoning used when thinking is on, answer): identity first, then a few everyday turns.
CHAT = [
    ("你是谁？", "用户问我的身份。", IDENTITY_ANSWER),
    ("Who are you?", "The user asks who I am.", "I am AutoGLM-Phone-9B, a multimodal model optimised for phones."),
    ("你好", "用户在打招呼。", "你好！有什么可以帮你？"),
    ("Hello!", "A greeting.", "Hello! How can I help?"),
    ("1+1等于几？", "1加1等于2。", "2"),
    ("What is 2+3?", "2 plus 3 is 5.", "5"),
    ("谢谢", "用户在道谢。", "不客气！"),
    ("Thanks!", "The user says thanks.", "You're welcome!"),
]


def make_image(shape: str, colour: str, position: str, size: int, rng: np.random.Generator):
    """One filled shape on a plain background; ~1/3 of the side, jittered by a few pixels."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), BACKGROUND)
    fx, fy = POSITIONS[position]
    third = size / 3
    r = third * rng.uniform(0.32, 0.45)  # half-width: stays inside its patch even with the jitter
    cx, cy = fx * size + rng.uniform(-1, 1) * (third / 2 - r), fy * size + rng.uniform(-1, 1) * (third / 2 - r)
    box, fill = (cx - r, cy - r, cx + r, cy + r), COLOURS[colour]
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return img


def make_tones(count: int, pitch: str, rng: np.random.Generator, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """`count` equal beeps (0.12-0.18 s, one frequency from the pitch's range) separated by 0.1-0.15 s
    of silence, in a clip of `seconds` at 16 kHz; float32 mono with a little noise."""
    if not 1 <= count <= MAX_BEEPS:
        raise ValueError(f"count must be in 1..{MAX_BEEPS}, got {count}")
    n = int(seconds * SAMPLE_RATE)
    out = (rng.standard_normal(n) * 0.003).astype(np.float32)
    hz, amp = rng.uniform(*PITCHES[pitch]), rng.uniform(0.3, 0.6)
    t0 = rng.uniform(0.05, 0.12)
    for _ in range(count):
        dur = rng.uniform(0.12, 0.18)
        k = np.arange(int(dur * SAMPLE_RATE))
        ramp = np.minimum(1.0, np.minimum(k, k[::-1]) / (0.005 * SAMPLE_RATE))  # 5 ms fades: no clicks
        start = int(t0 * SAMPLE_RATE)
        out[start:start + k.size] += (amp * ramp * np.sin(2 * np.pi * hz * k / SAMPLE_RATE)).astype(np.float32)
        t0 += dur + rng.uniform(0.1, 0.15)
    return out


def _name(word: str, lang: str) -> str:
    return ZH[word] if lang == "zh" else word


def _media_example(task: str, lang: str, rng: np.random.Generator) -> dict:
    pick = lambda xs: str(xs[int(rng.integers(len(xs)))])  # plain str, not np.str_
    shape, colour, position = pick(SHAPES), pick(list(COLOURS)), pick(list(POSITIONS))
    count, pitch = int(rng.integers(1, MAX_BEEPS + 1)), pick(list(PITCHES))
    question = pick(QUESTIONS[task][lang])
    parts: list[dict] = []
    if task in ("colour", "shape", "position", "both"):
        parts.append({"type": "image", "image": make_image(shape, colour, position, IMAGE_SIZE, rng)})
    if task in ("beeps", "pitch", "both"):
        parts.append({"type": "audio", "audio": make_tones(count, pitch, rng)})
    answer = {"colour": _name(colour, lang), "shape": _name(shape, lang), "position": _name(position, lang),
              "beeps": str(count), "pitch": _name(pitch, lang),
              "both": f"{_name(colour, lang)}{'，' if lang == 'zh' else ', '}{count}"}[task]
    truth = {"shape": shape, "colour": colour, "position": position, "count": count, "pitch": pitch}
    return {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}],
            "answer": answer, "reasoning": "", "enable_thinking": False, "task": task, "truth": truth}


def _text_example(task: str, rng: np.random.Generator) -> dict:
    user, reasoning, answer = CHAT[0] if task == "identity" else CHAT[int(rng.integers(1, len(CHAT)))]
    thinking = bool(rng.integers(2))  # both layouts: `<think>why</think>\nanswer` and `<think></think>\nanswer`
    return {"messages": [{"role": "user", "content": user}], "answer": answer,
            "reasoning": reasoning if thinking else "", "enable_thinking": thinking, "task": task, "truth": {}}


def examples(split: str, n: int, seed: int = 0) -> Iterator[dict]:
    """n examples cycling through TASKS (every task present once n >= len(TASKS)), language and
    content drawn from the split's own seed stream. Keys: messages, answer, task, enable_thinking,
    reasoning (the `<think>` text when thinking is on), truth (what was generated, for checks)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        if task in ("identity", "chat"):
            yield _text_example(task, rng)
        else:
            yield _media_example(task, "zh" if rng.integers(2) else "en", rng)


def target_text(example: dict) -> str:
    """What the model writes after render_chat's generation prompt (which already opened `<think>`,
    or wrote `<think></think>\\n` when thinking is off); the end-of-turn token is added by the caller."""
    if example["enable_thinking"]:
        return f"{example['reasoning']}</think>\n{example['answer']}"
    return example["answer"]


def training_texts() -> list[str]:
    """Every string the tasks can produce: the tokenizer's training corpus."""
    texts = [q for per in QUESTIONS.values() for qs in per.values() for q in qs]
    texts += [w for w in list(ZH) + list(ZH.values())] + [str(i) for i in range(MAX_BEEPS + 1)]
    texts += [s for turn in CHAT for s in turn] + ["，", ", ", "\n"]
    return texts
