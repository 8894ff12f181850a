"""The inference engine: continuous batching on the paged KV cache, sampling, streaming."""
from ..sampling import SamplingParams
from .async_engine import AsyncEngine
from .engine import Engine
from .request import RequestOutput
from .scheduler import SchedulerConfig

__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams", "SchedulerConfig"]
