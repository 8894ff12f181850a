"""Print the compile matrix: registers, spills and shared memory of every kernel config on
sm_80 / sm_89 / sm_90, compiled on this machine without a GPU.

    python -m benchmarks.compile_report  (or autoglm_fast.benchmarks.compile_report) [--target sm_89] [--kernel adapter_attention]
"""
from __future__ import annotations

import argparse
import sys

from autoglm_fast.kernels.compile_matrix import TARGETS, compile_all, format_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all")
    p.add_argument("--kernel", action="append", help="only kernels with this name (repeatable)")
    args = p.parse_args(argv)
    results = compile_all(args.kernel, args.target)
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
