"""Where does model averaging's per-step overhead come from (forced CPU devices)?

Builds the transform up from plain local SGD, one piece at a time, and times each
program through the runner and as the compiled program called directly (no Python
runner overhead), interleaved, medians over repetitions:

* ``sgd``: plain ``optax.sgd`` (no exchange, no shared state);
* ``cond``: + a shared step count and a ``lax.cond`` holding the averaging (never taken);
* ``cond+target``: + the exact-assignment target (a parameter-sized shared tree) carried
  in the state and ``wagrad.apply_updates``;
* ``model_averaging``: the real transform (period 10^6, never exchanging in the run).

    python benchmarks/overhead_ablation.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import wagrad  # noqa: E402
from wagrad._src import base  # noqa: E402
from overhead import setup, wagrad_variant  # noqa: E402

NEVER = 1_000_000


@base.shared_state
class _Count:
  count: jax.Array


@base.shared_state
class _CountTarget:
  count: jax.Array
  target: object
  assign: jax.Array


def _staged(with_target, axis_name="workers"):
  sgd = optax.sgd(0.05)
  tm = jax.tree_util.tree_map

  def init(p):
    sh = _CountTarget(jnp.int32(0), p, jnp.bool_(False)) if with_target else _Count(jnp.int32(0))
    return sgd.init(p), sh

  def update(g, state, p, **kw):
    inner, sh = state
    u, inner = sgd.update(g, inner, p)
    xh = tm(jnp.add, p, u)
    pred = (sh.count + 1) % NEVER == 0
    if with_target:
      xn, t2 = lax.cond(pred, lambda q, t: (wagrad.pmean_tree(q, axis_name),) * 2,
                        lambda q, t: (q, t), xh, sh.target)
      return tm(jnp.subtract, xn, p), (inner, _CountTarget(sh.count + 1, t2, pred))
    xn = lax.cond(pred, lambda q: wagrad.pmean_tree(q, axis_name), lambda q: q, xh)
    return tm(jnp.subtract, xn, p), (inner, _Count(sh.count + 1))

  return optax.GradientTransformationExtraArgs(init, update)


def main(argv=None):
  steps, reps = 300, 5
  runner = wagrad.Runner("shard_map", 8)
  p0, x, y, loss_fn = setup(8, 32, 256)
  txs = {"sgd": optax.sgd(0.05), "cond": _staged(False), "cond+target": _staged(True),
         "model_averaging": wagrad.model_averaging(optax.sgd(0.05), NEVER)}
  variants = {}
  for name, tx in txs.items():
    f, st = wagrad_variant(runner, tx, p0, x, y, loss_fn)
    st = jax.block_until_ready(f(*st))
    compiled = f.lower(*st).compile()
    variants[name + " (runner)"] = [f, st]
    variants[name + " (compiled)"] = [lambda *a, c=compiled: c(*a), st]
  times = {k: [] for k in variants}
  for _ in range(reps):
    for k, v in variants.items():
      dt, v[1] = common.time_steps(v[0], v[1], steps)
      times[k].append(dt)
  rows = [{"variant": k, "median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * min(v),
           "max_ms": 1e3 * max(v)} for k, v in times.items()]
  for r in rows:
    print(f"{r['variant']:32s} {r['median_ms']:.3f} ms")
  common.save("overhead_ablation", {"device": common.device_info(), "steps": steps,
                                    "reps": reps, "rows": rows})
  return rows


if __name__ == "__main__":
  main()
