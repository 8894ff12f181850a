"""autoglm-fast: Triton kernels and an inference engine for AutoGLM-Phone-9B."""
from .config import (AdapterConfig, AudioConfig, AutoGLMPhoneConfig, FusionConfig, TextConfig,
                     VisionConfig)

__version__ = "0.1.0"


def apply_fast_kernels(model):
    """Swap every supported reference layer of `model` for its Triton twin, in place; returns a report."""
    from .fast import apply_fast_kernels as apply  # imports triton only when asked for
    return apply(model)

__all__ = ["AutoGLMPhoneConfig", "TextConfig", "VisionConfig", "AudioConfig", "AdapterConfig",
           "FusionConfig", "apply_fast_kernels", "__version__"]
