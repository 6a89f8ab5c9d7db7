"""The staleness-aware paper's experiment in miniature (arXiv 1511.05950, its figure of
test error against n): lambda = 16 learners on digits, n-softsync for n = 1 ... 16
(c = lambda / n gradients per server update, random arrival order), the learning rate
fixed (plain ASGD) or divided by each gradient's staleness (alpha0 / tau).

The paper's headline: with many learners, n-softsync at a fixed rate fails once n is
large (with 30 learners, 15- and 30-softsync stayed at chance), while the modulated rate
converges for every n. Every learner draws from the whole training set (a parameter
server's learners), seeds 0..S-1; reported per (rate, alpha0, n): mean and min/max test
accuracy of the server's parameters after the same number of server updates' worth of
gradients (steps x lambda x batch samples for every n).

    python benchmarks/staleness_sweep.py            # lambda 16, alpha0 0.2 and 0.8, 3 seeds
    python benchmarks/staleness_sweep.py --seeds 1 --steps 100

Writes ``results/staleness_sweep.json`` and ``.png``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

from digits_lib import train_digits  # noqa: E402

RATES = {"fixed (plain ASGD)": "asgd", "alpha0 / staleness": "staleness_aware"}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--learners", type=int, default=16)
  ap.add_argument("--ns", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... lambda")
  ap.add_argument("--alpha0", type=float, nargs="+", default=[0.2, 0.8])
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--out", default="staleness_sweep")
  args = ap.parse_args(argv)
  K = args.learners
  ns = args.ns or [n for n in (1, 2, 4, 8, 16, 32) if n <= K and K % n == 0]
  rows = []
  for a0 in args.alpha0:
    for label, name in RATES.items():
      for n in ns:
        accs = []
        for seed in range(args.seeds):
          # the registry's entries run alpha0 = 2 lr (lr is the example's SGD rate)
          r = train_digits([name], workers=K, steps=args.steps, batch=args.batch, lr=a0 / 2,
                           eval_every=args.steps, seed=seed, progress=False, softsync_n=n,
                           sampling="whole")[0]
          accs.append(r["test_acc"])
        rows.append({"rate": label, "alpha0": a0, "n": n, "acc": accs,
                     "mean": float(np.mean(accs))})
        print(f"alpha0 {a0:<4} {label:20s} n={n:<3d} test acc {np.mean(accs):.3f} "
              f"[{min(accs):.3f}, {max(accs):.3f}]", flush=True)
  data = {"device": common.device_info(), "learners": K, "steps": args.steps,
          "batch": args.batch, "seeds": args.seeds, "sampling": "whole", "rows": rows}
  common.save(args.out, data)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(args.alpha0), figsize=(5.5 * len(args.alpha0), 4.2),
                           squeeze=False)
  for ax, a0 in zip(axes[0], args.alpha0):
    for label in RATES:
      sel = [r for r in rows if r["alpha0"] == a0 and r["rate"] == label]
      ax.errorbar([r["n"] for r in sel], [r["mean"] for r in sel],
                  yerr=[[r["mean"] - min(r["acc"]) for r in sel],
                        [max(r["acc"]) - r["mean"] for r in sel]], marker="o", capsize=3,
                  label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"n of n-softsync ({K} learners)")
    ax.set_ylabel("test accuracy (server)")
    ax.set_title(f"alpha0 = {a0}")
    ax.axhline(0.1, color="gray", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"digits, {K} learners, {args.steps} steps, {args.seeds} seeds")
  fig.tight_layout()
  path = os.path.join(common.OUT, args.out + ".png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f"wrote {path}")
  return data


if __name__ == "__main__":
  main()
