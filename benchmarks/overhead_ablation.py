"""Where does a periodic algorithm's per-step overhead come from (forced CPU devices)?

Starts from the hand-written averaging step of ``overhead.py`` (a ``lax.cond`` holding
a per-leaf ``lax.pmean``, never taken in these runs) and adds one thing at a time to the
state the step carries in and out, then compares with wagrad's model averaging (period
10^6, so no exchange runs either). Interleaved repetitions, medians, tiny model (where
the fixed per-step costs show):

* ``local sgd``: no cond at all;
* ``hand``: the cond, a replicated step count in the state;
* ``hand + 2 scalars`` / ``hand + 6 scalars``: more replicated int32 scalars in the state
  (model averaging used to carry count, last exchange, exchange count and assign as
  four of them; they now travel as one int32[4], ``base.Clock``);
* ``hand + flat target``: a replicated parameter-sized flat buffer carried through (the
  exact-assignment target, ``base.Flat``);
* ``hand as updates``: the cond returns updates that ``optax.apply_updates`` adds, as
  an optax transform must;
* ``wagrad model_averaging``: the real transform through ``wagrad.Runner`` (exact
  assignment: it carries the target), and with ``exact=False`` (no target).

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
from jax.sharding import PartitionSpec as P  # noqa: E402

import wagrad  # noqa: E402
from overhead import LR, setup, wagrad_variant  # noqa: E402

NEVER = 1_000_000


def hand_step(runner, p0, x, y, loss_fn, *, cond=True, scalars=0, target=False,
              as_updates=False):
  sgd = optax.sgd(LR)
  tm = jax.tree_util.tree_map

  def body(p, count, extra, x, y):
    p, x, y = tm(lambda a: a[0], (p, x, y))
    _, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, _ = sgd.update(g, sgd.init(p), p)
    if as_updates:
      x_new = lax.cond((count + 1) % NEVER == 0,
                       lambda x: tm(lambda a: lax.pmean(a, "workers"), x), lambda x: x,
                       optax.apply_updates(p, u))
      u = tm(lambda a, b: a - b, x_new, p)
    p = optax.apply_updates(p, u)
    if cond and not as_updates:
      p = lax.cond((count + 1) % NEVER == 0,
                   lambda p: tm(lambda a: lax.pmean(a, "workers"), p), lambda p: p, p)
    ints, flat = extra
    ints = tuple(i + 1 for i in ints)
    return tm(lambda a: a[None], p), count + 1, (ints, flat), x[None], y[None]

  specs = (P("workers"), P(), P(), P("workers"), P("workers"))
  f = jax.jit(jax.shard_map(body, mesh=runner.mesh, in_specs=specs, out_specs=specs,
                            check_vma=False))
  flat = wagrad.Shared(jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(p0)])
                       ) if target else None
  extra = (tuple(jnp.int32(0) for _ in range(scalars)), None if flat is None else flat.value)
  return f, (runner.replicate(p0), jnp.int32(0), extra, runner.put(x), runner.put(y))


def main(argv=None):
  steps, reps = 200, 9
  runner = wagrad.Runner("shard_map", 8)
  p0, x, y, loss_fn = setup(8, 32, 256)
  variants = {
      "local sgd": hand_step(runner, p0, x, y, loss_fn, cond=False),
      "hand": hand_step(runner, p0, x, y, loss_fn),
      "hand + 2 scalars": hand_step(runner, p0, x, y, loss_fn, scalars=2),
      "hand + 6 scalars": hand_step(runner, p0, x, y, loss_fn, scalars=6),
      "hand + flat target": hand_step(runner, p0, x, y, loss_fn, target=True),
      "hand as updates": hand_step(runner, p0, x, y, loss_fn, as_updates=True),
      "wagrad model_averaging": wagrad_variant(
          runner, wagrad.model_averaging(optax.sgd(LR), NEVER), p0, x, y, loss_fn,
          donate=False),
      "wagrad model_averaging exact=False": wagrad_variant(
          runner, wagrad.model_averaging(optax.sgd(LR), NEVER, exact=False), p0, x, y,
          loss_fn, donate=False),
  }
  states = {}
  for k, (f, st) in variants.items():
    states[k] = jax.block_until_ready(f(*st))
  times = {k: [] for k in variants}
  for _ in range(reps):
    for k, (f, _) in variants.items():
      dt, states[k] = common.time_steps(f, states[k], steps)
      times[k].append(dt)
  hand = np.asarray(times["hand"])
  rows = [{"variant": k, "median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * min(v),
           "max_ms": 1e3 * max(v),
           # within each interleaved repetition, this program's time over the hand one's
           "paired_ratio_to_hand": float(np.median(np.asarray(v) / hand))}
          for k, v in times.items()]
  for r in rows:
    print(f"{r['variant']:36s} {r['median_ms']:.3f} ms  x{r['paired_ratio_to_hand']:.3f} hand")
  common.save("overhead_ablation", {"device": common.device_info(), "steps": steps,
                                    "reps": reps, "rows": rows})
  return rows


if __name__ == "__main__":
  main()
