"""python -m benchmarks (or autoglm_fast.benchmarks): the same as `autoglm-fast bench`."""
import sys

from .suite import main

sys.exit(main())
