"""A tensor-parallel worker (ranks 1..N-1) and the one message per step it gets from rank 0.

Rank 0 runs the engine's scheduler; each step it broadcasts a `StepMessage` (over a gloo group: host
data) and every rank then runs that step, its collectives paired with rank 0's. A worker applies the
message in rank 0's order (`Engine.follow`): the tokens rank 0 sampled last step, the requests added and
aborted since, the plan. Its own sampling is never used, so ranks cannot drift apart on random draws.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch

STARTUP_TIMEOUT = timedelta(minutes=30)  # loading a 9B checkpoint shard by shard can take a while


@dataclass
class StepMessage:
    sampled: list[tuple[str, int]] = field(default_factory=list)   # (request id, token) rank 0 appended last step
    commands: list[tuple] = field(default_factory=list)   # ("add", id, prompt ids, media, params) | ("abort", id)
    preempted: list[str] = field(default_factory=list)     # in the order rank 0 preempted them
    scheduled: list[tuple[str, int, int]] = field(default_factory=list)  # (id, tokens, num_computed after scheduling)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on GPUs (one per rank), the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_group(tp, port: int, device_type: str) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs; rank 0 hosts the rendezvous) and set tp.group,
    and tp.host_group for the per-step messages (gloo: they are host objects)."""
    import torch.distributed as dist
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=tp.rank, world_size=tp.size,
                            timeout=STARTUP_TIMEOUT)
    tp.group = dist.group.WORLD
    tp.host_group = dist.new_group(backend="gloo") if backend != "gloo" else tp.group


def receive(tp) -> StepMessage | None:
    import torch.distributed as dist
    box = [None]
    dist.broadcast_object_list(box, src=0, group=tp.host_group)
    return box[0]


def send(tp, message: StepMessage | None) -> None:
    import torch.distributed as dist
    dist.broadcast_object_list([message], src=0, group=tp.host_group)


def worker_main(build, rank: int, size: int, port: int, device_type: str, status_fd: int) -> None:
    """A worker process (`python -m autoglm_fast.parallel`): build this rank's engine (its shard of the
    weights), say so to rank 0 on `status_fd` (or why not), join the group, then follow rank 0's steps
    until it says stop (None) or goes away."""
    from .sharding import TensorParallel
    _exit_with_parent(os.getppid())
    with os.fdopen(status_fd, "w") as status:
        try:
            device = rank_device(torch.device(device_type), rank)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            tp = TensorParallel(rank, size)
            engine = build(_tensor_parallel=tp, device=str(device))
            status.write("built\n")
        except BaseException:  # noqa: BLE001 - rank 0 reports it and stops the others
            status.write(traceback.format_exc())
            sys.exit(1)
    init_group(tp, port, device_type)
    try:
        while (message := receive(tp)) is not None:
            engine.follow(message)
    except BaseException:  # noqa: BLE001 - a dead rank 0 (connection closed) ends the worker too
        traceback.print_exc()
        sys.stderr.write(f"autoglm-fast: tensor-parallel worker rank {rank} stops\n")
        sys.exit(1)
    import torch.distributed as dist
    dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    """A worker whose rank 0 was killed outright exits too, even if blocked in a collective that never ends."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="autoglm-fast-parent-watch").start()
