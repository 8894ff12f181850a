import pytest
import torch

from autoglm_fast.config import AutoGLMPhoneConfig


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nano_config() -> AutoGLMPhoneConfig:
    return AutoGLMPhoneConfig.preset("nano")
