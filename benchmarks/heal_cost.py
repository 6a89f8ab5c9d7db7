"""What healing a non-finite worker's optimizer state costs per step.

EASGD with a momentum inner optimizer (``optax.sgd(0.05, momentum=0.9)``, tau 4), the
1M MLP of ``overhead.py``, 8 workers on ``vmap`` and on ``shard_map`` over 8 forced CPU
devices, state donated. Three builds of the same step, compiled in one process and
timed in interleaved repetitions, ratio to "none" taken within each repetition:

* ``none``: the inner state is never restarted (``periodic.reset_inner_where`` off);
* ``every step``: a per-worker select over the inner state on every step (the first
  version of the heal);
* ``exchange steps``: the select inside a ``lax.cond`` on the shared exchange flag
  (what wagrad does).

    python benchmarks/heal_cost.py     # writes results/heal_cost_cpu.json
"""

import common
import jax
import numpy as np
import optax

import overhead
import wagrad
from wagrad._src import periodic

VARIANTS = {
    "none": lambda f, i, s, p, when=None: s,
    "every step": lambda f, i, s, p, when=None: ORIG(f, i, s, p),
    "exchange steps": None,
}
ORIG = periodic.reset_inner_where


def run(backend, steps=16, reps=6):
  r = wagrad.Runner(backend, overhead.K)
  p0 = overhead.init_params(overhead.SIZES["1M"])
  rng = np.random.default_rng(1)
  x = r.put(rng.normal(size=(overhead.K, overhead.BATCH, overhead.IN)).astype(np.float32))
  y = r.put(rng.integers(0, overhead.OUT, size=(overhead.K, overhead.BATCH)).astype(np.int32))
  runs = {}
  for name, patch in VARIANTS.items():
    periodic.reset_inner_where = patch or ORIG  # read when the step is traced, below
    tx = wagrad.easgd(optax.sgd(0.05, momentum=0.9), 4, alpha=0.1)

    def step(p, s, x, y, tx=tx):
      u, s = tx.update(jax.grad(overhead.loss_fn)(p, x, y), s, p)
      return wagrad.apply_updates(p, u, s), s
    f = r.map(step, donate_argnums=(0, 1))
    st = (r.replicate(p0), r.init(tx, p0))
    for _ in range(4):  # compiles (tracing reads the patch) and warms up
      st = jax.block_until_ready(f(*st, x, y))
    runs[name] = [f, st, []]
  periodic.reset_inner_where = ORIG
  common.interleaved(runs, reps, steps, x, y)
  base = np.asarray(runs["none"][2])
  rows = []
  for name, (_, _, times) in runs.items():
    ratio = np.asarray(times) / base
    rows.append({"variant": name, "median_ms": 1e3 * float(np.median(times)),
                 "x_none_q25_q50_q75": [float(np.percentile(ratio, q)) for q in (25, 50, 75)]})
    print(f"  {backend:9s} {name:15s} {rows[-1]['median_ms']:7.2f} ms  "
          f"x{rows[-1]['x_none_q25_q50_q75'][1]:.3f} of none", flush=True)
  return {"backend": backend, "steps_per_rep": steps, "reps": reps, "rows": rows}


def main():
  data = {"device": common.device_info(), "size": "1M",
          "results": [run(b) for b in ("vmap", "shard_map")]}
  common.save(f"heal_cost_{data['device']['platform']}", data)
  return data


if __name__ == "__main__":
  main()
