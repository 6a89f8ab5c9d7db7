"""What the optax update API itself costs: the same hand-written math in two shapes.

``overhead.py`` compares each wagrad transform with the math written by hand as a step
that returns the new parameters: one ``lax.cond`` whose quiet branch passes the
half-step parameters through. A transform cannot take that shape: optax's contract is
``updates, state = tx.update(grads, state, params)`` then ``params + updates``, and
wagrad's exchanges assign the rule's value exactly (``wagrad.apply_updates`` takes
``shared.target`` on assigning steps, docs/design.md, Exact assignment). This script times, in
one process, interleaved, three steps of the same math with the same donated state:

* ``hand``: :func:`overhead.hand_step` (returns the new parameters);
* ``api``: the same math written by hand in the update API's shape, with nothing else
  -- no guards against non-finite workers, no clock fields, no metrics
  (:func:`api_step`): the branch returns the shared value (the mean, the new center),
  a select after it forms the worker's new parameters, the step returns
  ``updates = new - params`` and applies them as ``wagrad.apply_updates`` does
  (``where(assign, target, params + updates)``);
* ``wagrad``: the transform and ``wagrad.apply_updates``.

Paired ratios per repetition: ``api / hand`` is what the shape costs, ``wagrad / api``
what wagrad adds on top of it. Model averaging and EASGD (the two rules whose
exchange assigns / does not assign). For model averaging two diagnostic builds of the
transform split what wagrad adds (:func:`replaced_guard`): ``no guard`` (the workers'
mean without the guard against non-finite workers) and ``test only`` (the guard's
finiteness test of the sum, without the second sum it falls back to). Neither keeps
wagrad's rule for a non-finite worker; they say where its cost lies. Writes
``results/api_floor_<platform>.json``.

    python benchmarks/api_floor.py                       # 1M and 10M, both backends
    python benchmarks/api_floor.py --sizes 1M --taus 1,16 --reps 3
"""

import argparse
import contextlib
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)
import overhead  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import wagrad  # noqa: E402
from wagrad._src import collectives  # noqa: E402

ALGOS = ("averaging", "easgd")
LR, K, A = overhead.LR, overhead.K, overhead.EASGD_ALPHA


PAGE = resource.getpagesize()


def minor_faults():
  """Minor page faults of this process so far (fresh memory touched for the first time)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fmt(d):
  return "/".join(f"{v:.0f}" for v in d.values())


def api_step(algo, tau, ax):
  """The hand-written math in the update API's shape: ``(p, state, x, y) -> (p, state)``
  with ``state = Shared((count, shared_value))`` (the mean or the center)."""
  tm = jax.tree_util.tree_map
  where = lambda c, a, b: tm(lambda u, v: jnp.where(c, u, v), a, b)  # noqa: E731

  def step(p, s, x, y):
    _, g = jax.value_and_grad(overhead.loss_fn)(p, x, y)  # as the wagrad step, which needs the loss
    count, shared = s.value
    ex = (count + 1) % tau == 0
    xh = tm(lambda a, b: a - LR * b, p, g)
    if algo == "averaging":  # the branch returns the mean; every worker takes it
      shared = lax.cond(ex, lambda xh, t: lax.pmean(xh, ax), lambda xh, t: t, xh, shared)
      new = where(ex, shared, xh)
    else:  # EASGD: the branch moves the center; the elastic step is a select after it
      c = shared
      shared = lax.cond(ex, lambda c: tm(lambda c_, t: c_ + A * t, c, lax.psum(
          tm(lambda a, b: a - b, p, c), ax)), lambda c: c, c)
      new = where(ex, tm(lambda h, a, c_: h - A * (a - c_), xh, p, c), xh)
    updates = tm(lambda n, a: n - a, new, p)       # what tx.update returns
    new = tm(lambda a, u: a + u, p, updates)       # wagrad.apply_updates: params + updates,
    if algo == "averaging":                        # and the mean exactly where it assigns
      new = where(ex, shared, new)
    return new, wagrad.Shared((count + 1, shared))
  return step


def api_variant(r, algo, tau, p0):
  cp = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), p0)
  f = r.map(api_step(algo, tau, r.axis_name), donate_argnums=(0, 1))
  return f, (r.replicate(p0), r.replicate(wagrad.Shared((jnp.int32(0), cp))))


GUARDS = {"no guard": "none", "test only": "test"}


@contextlib.contextmanager
def replaced_guard(guard):
  """While a step is traced, ``weighted_mean``'s guard against non-finite workers is
  replaced: ``"none"`` sums everyone; ``"test"`` keeps the test of the sum and takes the
  fallback (the last global parameters) when it fails, with no second sum. Diagnostics
  only: neither keeps wagrad's rule for a non-finite worker. Yields the list of calls
  traced meanwhile (empty: the transform did not reach the replaced function)."""
  weighted_mean, calls = collectives.weighted_mean, []

  def replaced(tree, weight, axis_name, *, exclude_nonfinite=True, fallback=None):
    calls.append(guard)
    res = weighted_mean(tree, weight, axis_name, exclude_nonfinite=False, fallback=fallback)
    if guard == "none":
      return res
    clean = collectives.tree_is_finite(res.value)
    value = jax.tree_util.tree_map(lambda v, fb: jnp.where(clean, v, fb.astype(v.dtype)),
                                   res.value, tree if fallback is None else fallback)
    return res._replace(value=value, ok=res.ok & clean)

  collectives.weighted_mean = replaced
  try:
    yield calls
  finally:
    collectives.weighted_mean = weighted_mean


def run(size, backend, taus, algos, steps, reps):
  p0 = overhead.init_params(overhead.SIZES[size])
  n_params = int(sum(a.size for a in jax.tree_util.tree_leaves(p0)))
  r = wagrad.Runner(backend, K)
  rng = np.random.default_rng(1)
  x = r.put(rng.normal(size=(K, overhead.BATCH, overhead.IN)).astype(np.float32))
  y = r.put(rng.integers(0, overhead.OUT, size=(K, overhead.BATCH)).astype(np.int32))
  make = {"hand": overhead.hand_variant, "api": api_variant, "wagrad": overhead.wagrad_variant}
  results = []
  for tau in taus:
    for algo in algos:
      kinds = dict(make, **({k: overhead.wagrad_variant for k in GUARDS}
                            if algo == "averaging" else {}))
      variants, states, copies, temp_mb = {}, {}, {}, {}
      for kind, mk in kinds.items():
        f, st = mk(r, algo, tau, p0)
        with (replaced_guard(GUARDS[kind]) if kind in GUARDS
              else contextlib.nullcontext(["real guard"])) as traced:
          f = f.lower(*st, x, y).compile()  # timed as compiled: the guard stays replaced
        assert traced, f"{kind}: model_averaging did not call the replaced weighted_mean"
        copies[kind] = overhead.param_copies(f.as_text(), n_params)
        temp_mb[kind] = f.memory_analysis().temp_size_in_bytes / 2**20
        for _ in range(2):
          st = jax.block_until_ready(f(*st, x, y))
        variants[kind], states[kind] = f, st
      times, faults = {k: [] for k in kinds}, {k: [] for k in kinds}
      for _ in range(reps):
        for kind, f in variants.items():
          st, t0, f0 = states[kind], time.perf_counter(), minor_faults()
          for _ in range(steps):
            st = jax.block_until_ready(f(*st, x, y))
          times[kind].append((time.perf_counter() - t0) / steps)
          faults[kind].append((minor_faults() - f0) / steps)
          states[kind] = st
      t = {k: np.asarray(v) for k, v in times.items()}
      q = lambda v: [float(np.percentile(v, p)) for p in (25, 50, 75)]  # noqa: E731
      row = {"algo": algo, "tau": tau, "copies": copies, "temp_mib": temp_mb,
             "page_faults_mib_per_step": {k: float(np.median(v)) * PAGE / 2**20
                                          for k, v in faults.items()},
             "median_ms": {k: 1e3 * float(np.median(v)) for k, v in t.items()},
             "api_over_hand": q(t["api"] / t["hand"]),
             "wagrad_over_api": q(t["wagrad"] / t["api"]),
             "wagrad_over_hand": q(t["wagrad"] / t["hand"])}
      for k in GUARDS.keys() & t.keys():  # e.g. "no_guard_over_api"
        row[f"{k.replace(' ', '_')}_over_api"] = q(t[k] / t["api"])
      results.append(row)
      print(f"  {size} {backend} {algo:9s} tau={tau:<3d} hand {row['median_ms']['hand']:7.2f} ms"
            f"  api/hand x{row['api_over_hand'][1]:.3f}  wagrad/api "
            f"x{row['wagrad_over_api'][1]:.3f}  wagrad/hand x{row['wagrad_over_hand'][1]:.3f}"
            f"  temp MiB {fmt(temp_mb)}  faulted MiB/step "
            f"{fmt(row['page_faults_mib_per_step'])}"
            + "".join(f"  {k}/api x{row[k.replace(' ', '_') + '_over_api'][1]:.3f}"
                      for k in GUARDS if k in t), flush=True)
      del variants, states
  return {"size": size, "params": n_params, "backend": backend, "workers": K,
          "steps_per_rep": steps, "reps": reps, "rows": results}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="1M, tau 1 and 16, 3 repetitions")
  ap.add_argument("--sizes", default="1M,10M")
  ap.add_argument("--backends", default="shard_map,vmap")
  ap.add_argument("--taus", default="1,4,16")
  ap.add_argument("--algos", default=",".join(ALGOS))
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default=None, help="JSON name (default: api_floor_<platform>)")
  args = ap.parse_args(argv)
  if args.quick:
    args.sizes, args.taus, args.reps = "1M", "1,16", 3
  info = common.device_info()
  data = {"device": info, "runs": []}
  name = args.out or f"api_floor_{info['platform']}"
  for size in args.sizes.split(","):
    for backend in args.backends.split(","):
      steps = args.steps or {"0.27M": 32, "1M": 16, "10M": 4}.get(size, 4)
      print(f"== {size} on {backend}: {args.reps} x {steps} steps per variant", flush=True)
      data["runs"].append(run(size, backend, [int(t) for t in args.taus.split(",")],
                              args.algos.split(","), steps, args.reps))
      common.save(name, data)
  return data


if __name__ == "__main__":
  main()
