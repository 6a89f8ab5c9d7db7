"""Run every benchmark (reduced size with --quick; under 15 minutes on 2 cores).

    python benchmarks/run_all.py --quick

Writes benchmarks/results/{overhead,api_floor,scaling,convergence}_<platform>.json (and
PNGs); `python benchmarks/report.py` prints the tables of benchmarks/README.md from them.
The multi-process comparison with PyTorch (`multiprocess.py`) and the exchange,
straggler and staleness benchmarks run separately (see benchmarks/README.md).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (forced CPU devices before JAX starts)

import api_floor  # noqa: E402
import convergence  # noqa: E402
import overhead  # noqa: E402
import scaling  # noqa: E402


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  for mod in (overhead, api_floor, scaling, convergence):
    t0 = time.perf_counter()
    print(f"== {mod.__name__} ==", flush=True)
    mod.main(argv)
    print(f"== {mod.__name__}: {time.perf_counter() - t0:.0f} s ==", flush=True)


if __name__ == "__main__":
  main()
