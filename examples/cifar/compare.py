"""The papers' CIFAR comparisons in one command, for a GPU host.

Runs every (workers, algorithm) pair with the same wall-clock training budget (the LSGD
paper compares under a 12-minute budget), one after the other in this process, then
writes ``compare.json`` (each run's ``summary.json``) and prints a Markdown table of
final and best test accuracy of the model each paper evaluates::

    python -m examples.cifar.compare --time-budget 720 --workers 4 8 \\
        --algorithms sync_sgd model_averaging easgd lsgd --seeds 0 1 2 3 4 --out runs/compare

With several ``--seeds`` every run is repeated per seed, and the papers' claims among
the algorithms run ("LSGD beats EASGD", ...) get a verdict per worker count from the
paired per-seed differences of final test accuracy (``examples/claims.py``: mean and
95% bootstrap interval; holds / does not hold / not resolved), in ``compare.json`` and
a second table.

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

from examples.claims import judge

# (claim, paper, better, worse): final test accuracy under the same wall-clock budget.
CLAIMS = [
    ("LSGD beats EASGD", "arXiv 1905.10395", "lsgd", "easgd"),
    ("LSGD beats synchronous SGD", "arXiv 1905.10395", "lsgd", "sync_sgd"),
    ("WASGD beats model averaging", "arXiv 2004.03749 (reconstruction)", "wasgd",
     "model_averaging"),
]

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
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--out", default="runs/compare")
  ap.add_argument("rest", nargs="*", help="after --: options for every run")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from examples.cifar import main as cifar_main
  rows = []
  for k in args.workers:
    for algo in args.algorithms:
      for seed in args.seeds:
        out = os.path.join(args.out, f"{algo}_K{k}" + (f"_s{seed}" if len(args.seeds) > 1 else ""))
        rc = cifar_main.main(DEFAULTS + ["--algorithm", algo, "--workers", str(k),
                                         "--time-budget", str(args.time_budget), "--out", out,
                                         "--seed", str(seed), "--no-plot"] + list(args.rest))
        if rc != 0:
          return rc
        with open(os.path.join(out, "summary.json")) as f:
          rows.append({**json.load(f), "seed": seed})
  verdicts = claims_report(rows)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump({"time_budget": args.time_budget, "defaults": DEFAULTS, "extra": args.rest,
               "seeds": args.seeds, "runs": rows, "claims": verdicts}, f, indent=1)
  print(f"\n{args.time_budget:g} s of training per run\n")
  print("| workers | algorithm | seed | steps | final test accuracy | best |")
  print("| ---: | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['workers']} | {r['algorithm']} | {r['seed']} | {r['steps_done']} | "
          f"{r['final']['test_accuracy']:.4f} | {r['best_test_accuracy']:.4f} |")
  if verdicts:
    print("\n| claim | paper | workers | seeds | difference [95% interval] | verdict |")
    print("| --- | --- | ---: | ---: | --- | --- |")
    for v in verdicts:
      lo, hi = v["interval_95"]
      print(f"| {v['claim']} | {v['paper']} | {v['workers']} | {v['seeds']} | "
            f"{v['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {v['verdict']} |")
  return 0


def claims_report(rows) -> list:
  """Each claim of :data:`CLAIMS` whose two algorithms ran with the same workers and
  seeds: the paired verdict on final test accuracy (:func:`examples.claims.judge`)."""
  acc = {(r["algorithm"], r["workers"], r["seed"]): r["final"]["test_accuracy"] for r in rows}
  out = []
  for claim, paper, a, b in CLAIMS:
    for k in sorted({r["workers"] for r in rows}):
      seeds = sorted(s for (n, kk, s) in acc if n == a and kk == k and (b, k, s) in acc)
      if seeds:
        res = judge([acc[(a, k, s)] for s in seeds], [acc[(b, k, s)] for s in seeds])
        out.append({"claim": claim, "paper": paper, "workers": k, "better": a, "worse": b,
                    **res})
  return out


if __name__ == "__main__":
  sys.exit(main())
