"""One process of the multi-host test: 4 forced CPU devices, joined into 8 by
jax.distributed. Usage: multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_FILE [ALGO]."""
import os
import sys

port, nproc, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
algos = sys.argv[5].split(",") if len(sys.argv) > 5 else ["model_averaging"]
ndev = 8 // nproc
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402
import jax  # noqa: E402, F401  (imported after XLA_FLAGS is set)

import wagrad  # noqa: E402

if nproc > 1:
  wagrad.initialize_distributed(f"127.0.0.1:{port}", nproc, pid, timeout_seconds=60)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multihost_algos import run_algorithms  # noqa: E402

res = run_algorithms(algos)
if pid == 0:
  np.savez(out, **res)
print("ok", pid, flush=True)
