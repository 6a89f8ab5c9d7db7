"""The feature matrix README shows: which construction options each transform takes.

    python tests/feature_matrix.py      # prints README's table (8 forced CPU devices)

Every transform of ``_util.ALL_TRANSFORMS`` is built with each feature switched on. A
cell is ``yes`` when it builds and runs a few steps to finite parameters on 4 simulated
workers, ``no`` when the constructor refuses it (the reason is in the error), and
``n/a`` where the math has nothing to switch on (no period to schedule, no model
exchange). ``tests/test_matrix.py`` checks that
README's table is this one.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402

import wagrad  # noqa: E402

SCHEDULE = lambda t: jnp.where(t < 4, 2, 3)  # noqa: E731  a period that changes

# column -> the keyword arguments that switch the feature on
FEATURES = {
    "warm-up": {"warmup_steps": 2},
    "opt-state policy": {"opt_state_sync": "average"},
    "period schedule": {"sync_period": SCHEDULE},
    "compression": {"compression": "int8"},
    "fragments": {"num_fragments": 2},
    "update_alpha": {"update_alpha": 0.5},
}
# the period's own names, where a rule has other ones
PERIODS = {
    "tree_easgd": {"sync_period": (SCHEDULE, SCHEDULE)},
    "multi_leader_lsgd": {"local_period": SCHEDULE, "global_period": SCHEDULE,
                          "avg_size": 2},
    "staleness_aware_sgd": None,
    "lsgd": {"sync_period": SCHEDULE, "avg_size": 2},
    "async_lsgd": {"sync_period": SCHEDULE, "avg_size": 2},
}
# the rows: one per public transform, as _util builds them
ROWS = ["sync_sgd", "model_averaging", "diloco", "downpour", "easgd", "eamsgd",
        "async_easgd", "tree_easgd", "lsgd", "async_lsgd", "multi_leader_lsgd", "wasgd",
        "wasgd_plus", "wpsgd", "staleness_aware_sgd"]
STEPS = 4


def _runs(name, **kwargs):
  """Build ``name`` with ``kwargs`` on _util's settings and run STEPS steps; raises
  what the constructor raises."""
  build, per_step, groups = _util.ALL_TRANSFORMS[name]
  runner = wagrad.Runner("vmap", _util.ALL_K, groups=groups)
  tx = _with(build, runner, kwargs)
  A, b = _util.least_squares(_util.ALL_K)
  p0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}  # two leaves: fragments need them

  def loss_fn(p, A, b):
    return jnp.mean((A @ p["w"] + p["b"] - b) ** 2)

  def step(p, s, A, b, extra):
    loss, g = jax.value_and_grad(loss_fn)(p, A, b)
    u, s = tx.update(g, s, p, value=loss, **extra)
    return wagrad.apply_updates(p, u, s), s

  f = runner.map(step)
  p, s = runner.replicate(p0), runner.init(tx, p0)
  for t in range(STEPS):
    p, s = f(p, s, A, b, per_step(t) if per_step else {})
  return bool(np.isfinite(np.asarray(p["w"])).all())


def _with(build, runner, kwargs):
  """``build(runner)`` with ``kwargs`` added to its constructor call."""
  import functools
  import inspect
  originals = {n: getattr(wagrad, n) for n in ROWS}
  try:
    for n, fn in originals.items():
      setattr(wagrad, n, functools.partial(_merged, fn, kwargs,
                                           set(inspect.signature(fn).parameters)))
    return build(runner)
  finally:
    for n, fn in originals.items():
      setattr(wagrad, n, fn)


def _merged(fn, kwargs, _params, *args, **given):
  """Call ``fn`` with the feature's keyword arguments overriding the base call's (a
  positional period is replaced by a keyword one)."""
  if "sync_period" in kwargs and args[1:]:
    args = args[:1]
  return fn(*args, **{**given, **kwargs})


# what the math does not allow: synchronous SGD exchanges gradients every step (no
# period, no model exchange to warm up, fragment or blend)
NOT_APPLICABLE = {("sync_sgd", f) for f in FEATURES if f != "compression"}


def cell(name, feature):
  if (name, feature) in NOT_APPLICABLE:
    return "n/a"
  kwargs = FEATURES[feature]
  if feature == "period schedule":
    if PERIODS.get(name, kwargs) is None:
      return "n/a"
    kwargs = PERIODS.get(name, kwargs)
  try:
    return "yes" if _runs(name, **kwargs) else "non-finite"
  except (TypeError, ValueError):
    return "no"


def matrix():
  return {name: {f: cell(name, f) for f in FEATURES} for name in ROWS}


def table(m=None):
  m = m or matrix()
  head = "| transform | " + " | ".join(FEATURES) + " |"
  rule = "| --- |" + " :---: |" * len(FEATURES)
  rows = [f"| `{n}` | " + " | ".join(m[n][f] for f in FEATURES) + " |" for n in ROWS]
  return "\n".join([head, rule] + rows)


if __name__ == "__main__":
  print(table())
