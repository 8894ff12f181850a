"""Model families: which config and model class a preset name or a checkpoint directory means.

    autoglm-phone  the article's model (GLM + CLIP + Whisper + adapters + gated fusion): our own
                   config.json (`AutoGLMPhoneConfig`), presets autoglm-phone-9b, nano
    glm4v          the released AutoGLM-Phone-9B, GLM-4.1V (`Glm4vForConditionalGeneration`): a
                   transformers checkpoint directory as it ships, presets glm-4.1v-9b, glm4v-tiny

A family is found from `config.json`'s `architectures` / `model_type`, never by `if family ==` in
the callers: each entry says how to read its config and build its model.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str     # "module:Class" under autoglm_fast, imported on first use
    model_class: str
    runtime_class: str    # the engine's view of the family (families/runtime.py)
    presets: tuple[str, ...]
    matches: Callable[[dict], bool]  # does this config.json belong to the family?
    fast_modules: str | None = None  # "module:TABLE" of the family's own reference -> fast classes

    def fast_table(self) -> dict:
        return self._load(self.fast_modules) if self.fast_modules else {}

    def _load(self, path: str) -> Any:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module, __package__), attr)

    @property
    def config_cls(self):
        return self._load(self.config_class)

    @property
    def model_cls(self):
        return self._load(self.model_class)

    @property
    def runtime_cls(self):
        return self._load(self.runtime_class)

    def preset(self, name: str):
        return self.config_cls.preset(name)

    def load_config(self, directory: str | Path):
        return self.config_cls.from_checkpoint(directory)


def _is_glm4v(cfg: dict) -> bool:
    return "Glm4vForConditionalGeneration" in (cfg.get("architectures") or []) or cfg.get("model_type") == "glm4v"


def _is_autoglm_phone(cfg: dict) -> bool:
    return {"text", "vision", "audio"} <= set(cfg)


FAMILIES = (
    Family("autoglm-phone", "..config:AutoGLMPhoneConfig", "..reference.model:AutoGLMPhoneForCausalLM",
           ".autoglm_phone:AutoGLMPhoneRuntime", ("autoglm-phone-9b", "nano"), _is_autoglm_phone),
    Family("glm4v", ".glm4v.config:Glm4vConfig", ".glm4v.model:Glm4vForConditionalGeneration",
           ".glm4v.runtime:Glm4vRuntime", ("glm-4.1v-9b", "glm4v-tiny"), _is_glm4v,
           fast_modules=".glm4v.fast:FAST_MODULES"),
)


def family_for_preset(name: str) -> Family:
    for family in FAMILIES:
        if name in family.presets:
            return family
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(p for f in FAMILIES for p in f.presets)}")


def family_for_model(model) -> Family:
    for family in FAMILIES:
        if type(model) is family.model_cls:
            return family
    raise TypeError(f"no model family serves a {type(model).__name__}; "
                    f"expected one of {[f.model_class.rpartition(':')[2] for f in FAMILIES]}")


def family_for_checkpoint(directory: str | Path) -> Family:
    """The family whose config.json this directory holds (ValueError naming what was found if none)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json (not a checkpoint directory)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for family in FAMILIES:
        if isinstance(cfg, dict) and family.matches(cfg):
            return family
    found = cfg.get("architectures") or cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
    raise ValueError(f"{path}: architecture {found!r} is not supported; this engine serves "
                     "AutoGLMPhone checkpoints and Glm4vForConditionalGeneration (GLM-4.1V, the released "
                     "AutoGLM-Phone-9B)")
