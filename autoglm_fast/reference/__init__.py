"""Eager PyTorch reference of every part of AutoGLM-Phone: what the fast kernels are tested against."""
from .adapter import DualPathAdapter
from .clip import CLIPVisionModel
from .fusion import GatedFusion
from .glm import GlmForCausalLM, GlmModel, KVCache, RMSNorm
from .model import AutoGLMPhoneForCausalLM, ModalContext
from .whisper import WhisperEncoder

__all__ = ["AutoGLMPhoneForCausalLM", "ModalContext", "GlmForCausalLM", "GlmModel", "KVCache", "RMSNorm",
           "CLIPVisionModel", "WhisperEncoder", "DualPathAdapter", "GatedFusion"]
