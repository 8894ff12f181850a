"""Starting and stopping a tensor-parallel engine: rank 0 is the calling process (its Engine is the one you
get, scheduler and all), ranks 1..N-1 are spawned workers (worker.py), one device each.

Start-up: every rank builds its own shard (a checkpoint's ranks read only their slices), the workers report
through a pipe, then all join the torch.distributed group. A worker that dies is noticed at once by a
monitor thread on rank 0, which says so on stderr: the next step raises `WorkerDiedError` naming the
rank; a step blocked in a collective gets the same error once gloo reports the dead peer (NCCL may wait
for its timeout instead); with `exit_on_failure` (the server) the process exits at once with status 1.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .sharding import TensorParallel, local_text_config
from .worker import StepMessage, init_group, rank_device, send


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process ended while the engine needed it."""


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    status: int  # read end of the pipe it reports its start-up on

    def describe(self) -> str:
        code = self.process.poll()
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in
               signal.valid_signals() else f"exit code {code}")
        return f"tensor-parallel worker rank {self.rank} (pid {self.process.pid}) died ({how})"


def launch(build, size: int, device: str | None, config=None, align: int = 1):
    """Rank 0's engine, `build(_tensor_parallel=, device=)` on every rank, with its workers running.
    config, align: the model's and its 4-bit group size, to check that it splits in `size` before any
    process starts."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {size!r}")
    if config is not None:
        local_text_config(config.text, TensorParallel(0, size), align)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"tensor parallelism runs on CUDA GPUs (NCCL) or CPUs (gloo), not {device.type}")
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; this machine has {torch.cuda.device_count()}")
    import torch.distributed as dist
    if dist.is_initialized():
        raise RuntimeError("this process already has a torch.distributed process group: one tensor-parallel "
                           "engine per process (close() the other first)")
    port, workers = _free_port(), []
    try:
        for rank in range(1, size):
            workers.append(_start_worker(build, rank, size, port, device.type))
            sys.stderr.write(f"autoglm-fast: tensor-parallel worker rank {rank}: pid {workers[-1].process.pid}\n")
        tp = TensorParallel(0, size)
        engine = build(_tensor_parallel=tp, device=str(rank_device(device, 0)))
        _wait_built(workers)
        init_group(tp, port, device.type)
    except BaseException:
        for w in workers:
            w.process.kill()
        raise
    engine.driver = Driver(tp, workers)
    return engine


def _start_worker(build, rank: int, size: int, port: int, device_type: str) -> _Worker:
    read, write = os.pipe()
    package_root = str(Path(__file__).resolve().parents[2])  # importable as the caller has it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "autoglm_fast.parallel"], stdin=subprocess.PIPE,
                               pass_fds=(write,), env=env)
    os.close(write)
    process.stdin.write(pickle.dumps((build, rank, size, port, device_type, write)))
    process.stdin.close()
    return _Worker(rank, process, read)


def _wait_built(workers: list[_Worker]) -> None:
    """Until every worker has its shard loaded; a failure there raises WorkerDiedError with its traceback."""
    for w in workers:
        with os.fdopen(w.status) as status:
            report = status.read()  # "built" and then open until the worker exits, or its error at once
            if not report.startswith("built"):
                w.process.wait(timeout=30)
                raise WorkerDiedError(f"{w.describe()} while loading its shard" + (f":\n{report}" if report else ""))


class Driver:
    """Rank 0's side: what the workers must hear at the next step, sending it, and watching them."""

    def __init__(self, tp: TensorParallel, workers: list[_Worker]):
        self.tp, self.workers = tp, workers
        self.commands: list[tuple] = []           # add / abort since the last step (Engine records them)
        self.sampled: list[tuple[str, int]] = []  # tokens appended in the last step
        self.failure: str | None = None           # a worker died
        self.broken: str | None = None            # a step failed on rank 0 after its plan went out
        self.exit_on_failure = False              # the server's choice: a dead worker ends the process
        self.closed = False
        for w in workers:
            threading.Thread(target=self._monitor, args=(w,), daemon=True, name=f"tp{w.rank}-monitor").start()
        ref = weakref.ref(self)
        atexit.register(lambda: (d := ref()) is not None and d.close())

    def send(self, plan) -> None:
        """The step's message: everything a worker needs to run `plan` as rank 0 does. Sent once per step."""
        preempted = list(dict.fromkeys(r.request_id for r in plan.preempted))
        message = StepMessage(self.sampled, self.commands, preempted,
                              [(r.request_id, n, r.num_computed) for r, n in zip(plan.requests, plan.num_tokens)])
        self.sampled, self.commands = [], []
        send(self.tp, message)

    @contextlib.contextmanager
    def stepping(self):
        """Around a step: fail fast on a known-dead worker, and name it when a collective fails because of it.
        Any other failure leaves the workers mid-step, out of step with rank 0: they are stopped, and the
        engine refuses to step again."""
        if self.closed or self.broken:
            raise RuntimeError(self.broken or "this tensor-parallel engine was closed")
        if self.failure:
            raise WorkerDiedError(self.failure)
        try:
            yield
        except Exception as e:
            for w in self.workers:  # did gloo see a peer go? which one?
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.process.wait(timeout=2.0 / len(self.workers))
            dead = [w.describe() for w in self.workers if w.process.poll() is not None]
            if dead:
                raise WorkerDiedError("; ".join(dead)) from e
            self.broken = (f"a step failed on rank 0 ({type(e).__name__}: {e}); the tensor-parallel workers were "
                           "stopped: build a new engine")
            self.close()
            if self.exit_on_failure:
                self._fatal(self.broken)
            raise

    def _monitor(self, worker: _Worker) -> None:
        worker.process.wait()
        if self.closed:
            return
        self.failure = worker.describe()
        sys.stderr.write(f"autoglm-fast: error: {self.failure}\n")
        sys.stderr.flush()
        if self.exit_on_failure:
            self._fatal(self.failure)

    def _fatal(self, message: str) -> None:
        """The server's end: the other workers stopped, the message on stderr, exit status 1."""
        for w in self.workers:
            w.process.kill()
        sys.stderr.write(f"autoglm-fast: tensor parallelism failed, exiting: {message}\n")
        sys.stderr.flush()
        os._exit(1)

    def close(self) -> None:
        """Tell the workers to stop, wait for them, leave the process group."""
        if self.closed:
            return
        self.closed = True
        import torch.distributed as dist
        if not (self.failure or self.broken):  # else a worker may be inside a collective: no goodbye
            with contextlib.suppress(RuntimeError):
                send(self.tp, None)
        else:
            for w in self.workers:
                w.process.kill()
        for w in self.workers:
            try:
                w.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.process.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
