"""A tensor-parallel worker process: `python -m autoglm_fast.parallel` with its orders pickled on stdin
(parallel/launch.py starts it; a process of its own, so the caller's main module is never re-imported)."""
import pickle
import sys

from .worker import worker_main

if __name__ == "__main__":
    worker_main(*pickle.load(sys.stdin.buffer))
