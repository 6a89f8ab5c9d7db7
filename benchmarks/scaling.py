"""Scaling: simulated workers K = 1..64 with vmap on one device (time per step and the
compiled program's memory), and devices D = 1..8 with shard_map for K = 8 workers.

    python benchmarks/scaling.py [--quick]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402

import wagrad  # noqa: E402
from overhead import setup, wagrad_variant  # noqa: E402


def measure(runner, tau, steps, reps, batch, hidden):
  p0, x, y, loss_fn = setup(runner.num_workers, batch, hidden)
  tx = wagrad.model_averaging(optax.sgd(0.05), tau, axis_name=runner.axis_name)
  f, st = wagrad_variant(runner, tx, p0, x, y, loss_fn)
  st = common.warm_up(f, st)
  ts = []
  for _ in range(reps):
    dt, st = common.time_steps(f, st, steps)
    ts.append(dt)
  mem = f.lower(*st).compile().memory_analysis()
  mem_bytes = None
  if mem is not None:
    mem_bytes = int(getattr(mem, "argument_size_in_bytes", 0) + getattr(mem, "temp_size_in_bytes", 0)
                    + getattr(mem, "output_size_in_bytes", 0))
  return {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * min(ts),
          "max_ms": 1e3 * max(ts), "program_bytes": mem_bytes, "num_traces": f.num_traces()}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  steps, reps = (20, 3) if args.quick else (60, 5)
  batch, hidden, tau = 32, 256, 4
  vmap_rows = []
  for K in (1, 2, 4, 8, 16, 32, 64):
    row = {"workers": K, **measure(wagrad.Runner("vmap", K), tau, steps, reps, batch, hidden)}
    row["ms_per_worker"] = row["median_ms"] / K
    vmap_rows.append(row)
    print(f"vmap K={K:3d}: {row['median_ms']:8.3f} ms/step  {row['ms_per_worker']:.3f} ms/worker  "
          f"memory {row['program_bytes']}", flush=True)
  shard_rows = []
  for D in (1, 2, 4, 8):
    row = {"devices": D, "workers": 8,
           **measure(wagrad.Runner("shard_map", 8, num_devices=D), tau, steps, reps, batch, hidden)}
    shard_rows.append(row)
    print(f"shard_map D={D}, K=8: {row['median_ms']:8.3f} ms/step", flush=True)
  data = {"device": common.device_info(), "algorithm": f"model_averaging tau={tau}",
          "batch_per_worker": batch, "hidden": hidden, "vmap": vmap_rows, "shard_map": shard_rows}
  common.save("scaling", data)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(1, 2, figsize=(10, 4))
  axs[0].loglog([r["workers"] for r in vmap_rows], [r["median_ms"] for r in vmap_rows], "o-")
  axs[0].set_xlabel("simulated workers K (vmap, one device)")
  axs[0].set_ylabel("ms per step")
  axs[0].grid(alpha=0.3)
  axs[1].plot([r["devices"] for r in shard_rows], [r["median_ms"] for r in shard_rows], "o-")
  axs[1].set_xlabel("devices D (shard_map, K=8)")
  axs[1].set_ylabel("ms per step")
  axs[1].grid(alpha=0.3)
  fig.suptitle(f"scaling, {data['device']['platform']}")
  fig.tight_layout()
  path = os.path.join(common.OUT, "scaling.png")
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")
  return data


if __name__ == "__main__":
  main()
