"""The papers' CIFAR comparisons in one command, for a GPU host.

Runs every (workers, algorithm) pair with the same wall-clock training budget (the LSGD
paper compares under a 12-minute budget), one after the other in this process, then
writes ``compare.json`` (each run's ``summary.json``) and prints a Markdown table of
final and best test accuracy of the model each paper evaluates::

    python -m examples.cifar.compare --time-budget 720 --workers 4 8 \\
        --algorithms sync_sgd model_averaging easgd lsgd --out runs/compare

Defaults follow the LSGD authors' script (ResNet-20, SGD with Nesterov momentum 0.9,
weight decay 1e-4, batch 128 per worker, lr 0.1, every worker over the whole training
set: ``--sampling whole``, exchange period 4). Any other ``examples.cifar.main`` option
after ``--`` is passed to every run (``-- --sync-period 16 --beta 0.9``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULTS = ["--model", "resnet20", "--optimizer", "sgd", "--momentum", "0.9", "--nesterov",
            "--weight-decay", "1e-4", "--batch-size", "128", "--lr", "0.1",
            "--sampling", "whole", "--sync-period", "4", "--backend", "shard_map",
            "--epochs", "1000"]  # the budget, not the epochs, ends a run


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--time-budget", type=float, default=720.0, metavar="SECONDS")
  ap.add_argument("--workers", type=int, nargs="+", default=[4, 8])
  ap.add_argument("--algorithms", nargs="+",
                  default=["sync_sgd", "model_averaging", "easgd", "lsgd"])
  ap.add_argument("--out", default="runs/compare")
  ap.add_argument("rest", nargs="*", help="after --: options for every run")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from examples.cifar import main as cifar_main
  rows = []
  for k in args.workers:
    for algo in args.algorithms:
      out = os.path.join(args.out, f"{algo}_K{k}")
      rc = cifar_main.main(DEFAULTS + ["--algorithm", algo, "--workers", str(k),
                                       "--time-budget", str(args.time_budget), "--out", out,
                                       "--no-plot"] + list(args.rest))
      if rc != 0:
        return rc
      with open(os.path.join(out, "summary.json")) as f:
        rows.append(json.load(f))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump({"time_budget": args.time_budget, "defaults": DEFAULTS, "extra": args.rest,
               "runs": rows}, f, indent=1)
  print(f"\n{args.time_budget:g} s of training per run\n")
  print("| workers | algorithm | steps | final test accuracy | best |")
  print("| ---: | --- | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['workers']} | {r['algorithm']} | {r['steps_done']} | "
          f"{r['final']['test_accuracy']:.4f} | {r['best_test_accuracy']:.4f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
