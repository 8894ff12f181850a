"""Tensor parallelism over torch.distributed: sharding (sharding.py), the ranks' processes (launch.py) and
the per-step message rank 0 sends its workers (worker.py). See docs/parallel.md."""
from .sharding import TensorParallel

__all__ = ["TensorParallel"]
