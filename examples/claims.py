"""A claim "A beats B", judged from paired runs (same seed, same data order and initial
model for A and B): the mean of the per-seed differences with a 95% percentile
bootstrap interval; the claim **holds** when the interval lies above zero, **does not
hold** when below, and is **not resolved** otherwise. Used by
``benchmarks/convergence.py`` (digits) and ``examples/cifar/compare.py`` (CIFAR)."""

from __future__ import annotations

import numpy as np


def bootstrap_interval(diffs, resamples=10_000, seed=0):
  """95% percentile bootstrap interval of the mean of ``diffs``."""
  d = np.asarray(diffs, np.float64)
  idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
  means = d[idx].mean(1)
  return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def verdict(lo, hi):
  return "holds" if lo > 0 else ("does not hold" if hi < 0 else "not resolved")


def judge(acc_a, acc_b) -> dict:
  """The paired verdict of "A beats B" from per-seed accuracies (in the same seed order)."""
  diffs = np.asarray(acc_a, np.float64) - np.asarray(acc_b, np.float64)
  lo, hi = bootstrap_interval(diffs)
  return {"mean_difference": float(diffs.mean()), "interval_95": [lo, hi],
          "verdict": verdict(lo, hi), "seeds": len(diffs)}
