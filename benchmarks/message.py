"""How an exchange's message travels, within one process: the mean of a 1M-parameter
tree over 8 workers, each variant a donated jitted step through ``wagrad.Runner.map``,
interleaved repetitions, medians.

* ``pmean tree``: ``lax.pmean`` of the tree, as one writes it by hand;
* ``send, leaves`` / ``send, flat``: ``collectives.send`` with ``flat=False`` (the default
  within one process) and ``flat=True`` (one buffer per dtype, the default across
  processes);
* ``weighted_mean``: wagrad's mean with non-finite workers left out (sum first, a second
  sum only if the first is not finite);
* ``masked mean (v0.1)``: the previous form, every worker's tree masked and multiplied by
  its weight before the sum.

    python benchmarks/message.py            # writes results/message_<platform>.json
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import wagrad  # noqa: E402
from wagrad._src import collectives as C  # noqa: E402
from overhead import SIZES, init_params  # noqa: E402


def variants(ax):
  def masked_v01(tree):
    w = jnp.float32(1.0)
    finite = C.tree_is_finite(tree)
    w = jnp.where(finite, w, 0.0)
    contrib = jax.tree_util.tree_map(lambda x: w * jnp.where(finite, x, 0.0), tree)
    summed, total = C.send((contrib, w), lambda v: lax.psum(v, ax), flat=True)
    ok = total > 0
    return jax.tree_util.tree_map(
        lambda m, x: jnp.where(ok, m / jnp.where(ok, total, 1.0), x), summed, tree)
  return {"pmean tree": lambda t: lax.pmean(t, ax),
          "send, leaves": lambda t: C.send(t, lambda v: lax.pmean(v, ax), flat=False),
          "send, flat": lambda t: C.send(t, lambda v: lax.pmean(v, ax), flat=True),
          "weighted_mean": lambda t: C.weighted_mean(t, 1.0, ax).value,
          "masked mean (v0.1)": masked_v01}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="1M", choices=list(SIZES))
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args(argv)
  p0 = init_params(SIZES[args.size])
  data = {"device": common.device_info(), "size": args.size, "workers": 8, "backends": {}}
  for backend in ("shard_map", "vmap"):
    r = wagrad.Runner(backend, 8)
    fs = {k: r.map(f, donate_argnums=(0,)) for k, f in variants(r.axis_name).items()}
    st = {k: r.replicate(p0) for k in fs}
    for k, f in fs.items():
      for _ in range(2):
        st[k] = jax.block_until_ready(f(st[k]))
    times = {k: [] for k in fs}
    for _ in range(args.reps):
      for k, f in fs.items():
        t0 = time.perf_counter()
        for _ in range(args.calls):
          st[k] = jax.block_until_ready(f(st[k]))
        times[k].append((time.perf_counter() - t0) / args.calls)
    data["backends"][backend] = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    for k, v in data["backends"][backend].items():
      print(f"{backend:9s} {k:20s} {v:8.2f} ms", flush=True)
  common.save(f"message_{data['device']['platform']}", data)
  return data


if __name__ == "__main__":
  main()
