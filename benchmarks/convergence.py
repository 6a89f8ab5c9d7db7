"""Convergence on real data (scikit-learn digits, no download), 8 workers, several seeds:
every algorithm at the same sample budget (steps x workers x batch), test accuracy vs
steps, and each paper's headline claim checked with honest statistics.

A claim "A beats B" is run with the paper's data sampling (``whole``: every worker
draws from the whole training set with its own random stream, as the EASGD, LSGD and
staleness-aware papers' parameter servers and the LSGD authors' ``--random_sampler``;
``shards``: disjoint shards; the WASGD / WP-SGD reconstructions do not know theirs and
run both). Over seeds 0..S-1 (same data order and initial model for A and B in a seed)
the per-seed differences acc(A) - acc(B) give a mean and a 95% bootstrap interval
(10,000 resamples): the claim **holds** when the interval is above zero, **does not
hold** when below, and is **not resolved** otherwise.

    python benchmarks/convergence.py [--quick] [--seeds 5]
    python benchmarks/convergence.py --authors     # the authors' hyperparameters
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

from claims import bootstrap_interval, judge, verdict  # noqa: E402,F401  (tests use them)
from digits_lib import ALGORITHMS, train_digits  # noqa: E402

# (claim, paper, better, worse, sync_period, sampling modes): "better reaches higher
# final test accuracy than worse".
CLAIMS = [
    ("EASGD beats DOWNPOUR at large tau", "arXiv 1412.6651", "easgd", "downpour", 32,
     ("whole",)),
    ("EAMSGD beats EASGD at large tau", "arXiv 1412.6651", "eamsgd", "easgd", 32, ("whole",)),
    ("LSGD beats EASGD", "arXiv 1905.10395", "lsgd", "easgd", 8, ("whole",)),
    ("staleness-aware beats plain ASGD at high staleness (n = K)", "arXiv 1511.05950",
     "staleness_aware", "asgd", 8, ("whole",)),
    ("WASGD beats plain model averaging", "arXiv 2004.03749 (reconstruction)", "wasgd",
     "model_averaging", 8, ("shards", "whole")),
    ("WASGD+ beats WASGD", "arXiv 2004.03749 (reconstruction)", "wasgd_plus", "wasgd", 8,
     ("shards", "whole")),
    ("WP-SGD beats plain averaging under unbalanced load (half the workers 4x slower)",
     "arXiv 1708.04801 (reconstruction)", "wpsgd", "averaging_unbalanced", 8,
     ("shards", "whole")),
]


# The same comparisons with the hyperparameters the authors' code gives
# (digits_lib.PAPER_SETTINGS): EASGD's launch script (EASGD eta 0.1;
# EAMSGD eta 0.01, delta 0.99), the LSGD authors' defaults (pulls and proximal terms
# 0.1; Nesterov 0.9, weight decay 1e-4; l_comm = g_comm / 4 with g_comm 16).
AUTHORS_CLAIMS = [
    ("EAMSGD beats EASGD at large tau, the authors' eta and delta", "arXiv 1412.6651",
     "eamsgd_authors", "easgd_authors", 32, ("whole",)),
    ("LSGD beats EASGD, the LSGD authors' local optimizer for both", "arXiv 1905.10395",
     "lsgd_authors", "easgd_lsgd_inner", 16, ("whole",)),
    ("multi-leader LSGD (2 groups) beats single-leader LSGD, the authors' defaults",
     "arXiv 1905.10395", "multi_leader_lsgd_authors", "lsgd_authors", 16, ("whole",)),
]


def check_claims(claims, final, run, seeds, steps):
  """Each claim over the seeds (runs not yet in ``final`` are made); its table rows."""
  table = []
  for claim, paper, a, b, tau, modes in claims:
    for sampling in modes:
      for name in (a, b):
        if (name, tau, sampling) not in final:
          final[(name, tau, sampling)] = [run(name, tau, sampling, seed, steps)["test_acc"]
                                          for seed in seeds]
      acc_a, acc_b = final[(a, tau, sampling)], final[(b, tau, sampling)]
      res = judge(acc_a, acc_b)
      (lo, hi), d = res["interval_95"], res["mean_difference"]
      table.append({"claim": claim, "paper": paper, "sync_period": tau, "sampling": sampling,
                    a: acc_a, b: acc_b, "mean_difference": d, "interval_95": [lo, hi],
                    "verdict": res["verdict"]})
      print(f"{claim:62s} [{sampling}] {a} {np.mean(acc_a):.3f} vs {b} {np.mean(acc_b):.3f}: "
            f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] {res['verdict']}", flush=True)
  return table


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seeds", type=int, default=None)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--authors", action="store_true",
                  help="only the claims with the authors' hyperparameters "
                       "(writes convergence_authors.json)")
  args = ap.parse_args(argv)
  seeds = list(range(args.seeds or (2 if args.quick else 5)))
  steps = args.steps or (150 if args.quick else 400)
  batch, lr, K = 16, 0.1, 8
  names = list(ALGORITHMS)
  curves = {}
  final = {}

  def run(name, tau, sampling, seed, eval_every):
    return train_digits([name], workers=K, steps=steps, batch=batch, lr=lr, sync_period=tau,
                        eval_every=eval_every, seed=seed, progress=False,
                        sampling=sampling)[0]

  if args.authors:
    table = check_claims(AUTHORS_CLAIMS, final, run, seeds, steps)
    data = {"device": common.device_info(), "workers": K, "batch_per_worker": batch,
            "lr": lr, "steps": steps, "seeds": seeds, "claims": table}
    common.save("convergence_authors", data)
    return data
  # 1) every algorithm at sync_period 8, disjoint shards
  for seed in seeds:
    for r in train_digits(names, workers=K, steps=steps, batch=batch, lr=lr, sync_period=8,
                          eval_every=max(steps // 10, 1), seed=seed, progress=False):
      curves.setdefault(r["algorithm"], []).append(r["curve_acc"])
      final.setdefault((r["algorithm"], 8, "shards"), []).append(r["test_acc"])
      steps_axis = r["curve_steps"]
    print(f"seed {seed}: all algorithms done", flush=True)
  # 2) each claim in the paper's sampling mode and period
  table = check_claims(CLAIMS, final, run, seeds, steps)
  # 3) simulated wall-clock under a heterogeneous-speed schedule (half the workers 4x
  # slower): a synchronous algorithm waits for the slowest worker (4 time units per step);
  # wpsgd / averaging_unbalanced let every worker go at its own pace (1 unit per step,
  # the slow workers are active one step in four). Same time budget for all.
  wall = {}
  budget = steps
  for name, per_step in (("model_averaging", 4), ("averaging_unbalanced", 1), ("wpsgd", 1)):
    accs = []
    for seed in seeds:
      r = train_digits([name], workers=K, steps=budget // per_step, batch=batch, lr=lr,
                       sync_period=8, eval_every=max(budget // per_step // 5, 1),
                       seed=seed, progress=False)[0]
      accs.append(r["curve_acc"])
      t_axis = [st * per_step for st in r["curve_steps"]]
    wall[name] = {"time": t_axis, "acc_mean": np.mean(accs, 0).tolist(),
                  "final_mean": float(np.mean([a[-1] for a in accs]))}
    print(f"wall-clock budget {budget}: {name:22s} {wall[name]['final_mean']:.3f}", flush=True)
  summary = {name: {"mean": float(np.mean(final[(name, 8, "shards")])),
                    "std": float(np.std(final[(name, 8, "shards")]))} for name in names}
  for name, v in summary.items():
    print(f"{name:18s} {v['mean']:.3f} +- {v['std']:.3f}")
  data = {"device": common.device_info(), "workers": K, "batch_per_worker": batch, "lr": lr,
          "steps": steps, "seeds": seeds, "final_sync_period_8": summary, "claims": table,
          "simulated_wallclock": {"budget": budget, "speeds": "half the workers 4x slower",
                                  "runs": wall},
          "curves": {n: {"steps": steps_axis, "acc_mean": np.mean(c, 0).tolist()}
                     for n, c in curves.items()}}
  common.save("convergence", data)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
  for n, c in wall.items():
    ax2.plot(c["time"], c["acc_mean"], "o-", label=n)
  ax2.set_xlabel("simulated wall-clock (fast worker's step = 1)")
  ax2.set_ylabel("test accuracy")
  ax2.set_title("half the workers 4x slower: sync waits, the others do not")
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=8)
  for i, (n, c) in enumerate(data["curves"].items()):
    ax.plot(c["steps"], c["acc_mean"], label=n, color=plt.cm.tab20.colors[i % 20],
            linestyle=("-", "--", ":")[(i // 7) % 3])
  ax.set_xlabel("step (same samples per step for every algorithm)")
  ax.set_ylabel(f"test accuracy (mean of {len(seeds)} seeds)")
  ax.set_ylim(0.5, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = os.path.join(common.OUT, "convergence.png")
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")
  return data


if __name__ == "__main__":
  main()
