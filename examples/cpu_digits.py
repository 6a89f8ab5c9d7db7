"""wagrad on a laptop: 8 workers train an MLP on scikit-learn's digits with each algorithm.

No download: the digits data set (1797 8x8 images) ships with scikit-learn. Every
algorithm gets the same model, data (``--sampling``: disjoint shards, or every worker
drawing from the whole training set), seed and number of steps; the script prints
a table of test accuracy (of the model each paper evaluates) and wall time, and saves a
PNG of the test-accuracy curves and a JSON of the numbers.

    python examples/cpu_digits.py                       # all algorithms, ~1-2 min on 2 cores
    python examples/cpu_digits.py --algorithms sync_sgd model_averaging --steps 200
    python examples/cpu_digits.py --backend shard_map   # one worker per (forced) CPU device
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--algorithms", nargs="*", default=None,
                  help="which algorithms (default: all); see --list")
  ap.add_argument("--list", action="store_true", help="list the algorithms and exit")
  ap.add_argument("--workers", type=int, default=8)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=16, help="per-worker batch size")
  ap.add_argument("--lr", type=float, default=0.1)
  ap.add_argument("--sync-period", type=int, default=8)
  ap.add_argument("--eval-every", type=int, default=25)
  ap.add_argument("--backend", default="vmap", choices=["vmap", "shard_map", "pmap"])
  ap.add_argument("--devices", type=int, default=8,
                  help="forced CPU devices for shard_map/pmap on a CPU-only machine")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--worker-speeds", default=None,
                  help="comma-separated speeds in (0, 1], one per worker, for wpsgd and "
                       "averaging_unbalanced (default: half the workers 4x slower)")
  ap.add_argument("--softsync-n", type=int, default=None,
                  help="n of n-softsync for staleness_aware and asgd (default: workers, "
                       "fully asynchronous)")
  ap.add_argument("--sampling", default="shards", choices=["shards", "whole"],
                  help="each worker draws from its own disjoint shard (default), or from "
                       "the whole training set with its own random stream (the papers')")
  ap.add_argument("--out", default="runs/cpu_digits", help="folder for the JSON and PNG")
  ap.add_argument("--no-plot", action="store_true")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.backend != "vmap" and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from digits_lib import ALGORITHMS, train_digits  # noqa: E402  (after XLA_FLAGS)

  if args.list:
    for name, (_, desc) in ALGORITHMS.items():
      print(f"{name:24s} {desc}")
    return 0
  names = args.algorithms or list(ALGORITHMS)
  unknown = [n for n in names if n not in ALGORITHMS]
  if unknown:
    print(f"error: unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}",
          file=sys.stderr)
    return 2
  try:
    speeds = None
    if args.worker_speeds:
      try:
        speeds = [float(v) for v in args.worker_speeds.split(",")]
      except ValueError:
        raise ValueError(f"--worker-speeds must be numbers, got {args.worker_speeds!r}") from None
    results = train_digits(names, workers=args.workers, steps=args.steps, batch=args.batch,
                           lr=args.lr, sync_period=args.sync_period, eval_every=args.eval_every,
                           backend=args.backend, seed=args.seed, speeds=speeds,
                           softsync_n=args.softsync_n, sampling=args.sampling)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  print(f"\n{args.workers} workers, {args.steps} steps, batch {args.batch}/worker, "
        f"sync_period {args.sync_period}, backend {args.backend}, sampling {args.sampling}")
  print(f"{'algorithm':24s} {'evaluated model':18s} {'test acc':>8s} {'time (s)':>9s}")
  for r in results:
    print(f"{r['algorithm']:24s} {r['evaluated']:18s} {r['test_acc']:8.3f} {r['seconds']:9.1f}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"args": vars(args), "results": results}, f, indent=1)
  if not args.no_plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.tab20.colors
    for i, r in enumerate(results):
      ax.plot(r["curve_steps"], r["curve_acc"], label=r["algorithm"], color=colors[i % 20],
              linestyle=("-", "--", ":")[(i // 7) % 3])
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {args.workers} workers ({args.backend})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=110)
    print(f"saved {os.path.join(args.out, 'accuracy.png')} and results.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
