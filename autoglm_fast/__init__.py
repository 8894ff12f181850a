"""autoglm-fast: Triton kernels and an inference engine for AutoGLM-Phone-9B."""
from .config import (AdapterConfig, AudioConfig, AutoGLMPhoneConfig, FusionConfig, TextConfig,
                     VisionConfig)

__version__ = "0.1.0"
__all__ = ["AutoGLMPhoneConfig", "TextConfig", "VisionConfig", "AudioConfig", "AdapterConfig",
           "FusionConfig", "__version__"]
