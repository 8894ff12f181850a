"""Print the compile matrix: every kernel config on sm_80 / sm_89 / sm_90, compiled on this machine
without a GPU as a launch at the real shapes specializes it: registers, spills, shared memory, PTX
global loads / stores by access width (count x bits), MMA kind (wgmma / mma.sync / none), cp.async
and TMA (cp.async.bulk) copies.

    python -m autoglm_fast.benchmarks.compile_report [--target sm_89] [--kernel rms_norm] [--json FILE]

--json writes a list of objects with the keys kernel, config, target, registers, spill_bytes,
smem_bytes, global_loads / global_stores ({"128": n, ...}), mma, cp_async, tma.
"""
from __future__ import annotations

import argparse
import json
import sys

from autoglm_fast.kernels.compile_matrix import TARGETS, compile_all, format_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all")
    p.add_argument("--kernel", action="append", help="only kernels with this name (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args(argv)
    results = compile_all(args.kernel, args.target)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
