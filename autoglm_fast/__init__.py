"""autoglm-fast: Triton kernels and an inference engine for AutoGLM-Phone-9B."""
from .config import (AdapterConfig, AudioConfig, AutoGLMPhoneConfig, FusionConfig, TextConfig,
                     VisionConfig)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Engine", "AsyncEngine", "SamplingParams"):  # imported on first use (pulls in triton)
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'autoglm_fast' has no attribute {name!r}")


def apply_fast_kernels(model):
    """Swap every supported reference layer of `model` for its Triton twin, in place; returns a report."""
    from .fast import apply_fast_kernels as apply  # imports triton only when asked for
    return apply(model)

__all__ = ["AutoGLMPhoneConfig", "TextConfig", "VisionConfig", "AudioConfig", "AdapterConfig",
           "FusionConfig", "apply_fast_kernels", "Engine", "AsyncEngine", "SamplingParams", "__version__"]
