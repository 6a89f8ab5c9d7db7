"""Joining a model's parameters into one vector: ``jnp.concatenate`` against
``dynamic_update_slice`` into a fresh buffer (``wagrad``'s ``base.concat_by_updates``).

wagrad packs trees into flat buffers (shared states, a conditional's operands, fused
collectives). XLA:CPU fuses a concatenate with the ops that produce its operands, and
with some operand sizes that fused loop is slow. This script
times both joins on one device for the parameter shapes of ``overhead.py``'s two models
(the Flax MLP: bias, 64 x hidden kernel, 10-element bias, hidden x 10 kernel):

* ``as is``: the leaves are the program's inputs;
* ``computed``: each leaf comes out of an elementwise op in the same program (as a new
  center or a fresh update does), so the join is fused with it.

Medians over repetitions, microseconds per call; writes ``results/concat.json``.

    python benchmarks/concat.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from wagrad._src import base  # noqa: E402
from overhead import MODELS  # noqa: E402

JOINS = {"concatenate": base.concat_by_concatenate, "updates": base.concat_by_updates}


def programs(shapes, join):
  leaves = [jnp.ones(s, jnp.float32) for s in shapes]
  as_is = jax.jit(lambda ls: join([x.ravel() for x in ls]))
  computed = jax.jit(lambda ls: join([(x * 2.0 + 1.0).ravel() for x in ls]))
  return {"as is": (as_is, leaves), "computed": (computed, leaves)}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--reps", type=int, default=None)
  args = ap.parse_args(argv)
  reps = args.reps or (5 if args.quick else 9)
  calls = 50 if args.quick else 200
  rows = []
  for model, (_, hidden) in MODELS.items():
    shapes = [(hidden,), (64, hidden), (10,), (hidden, 10)]
    for name, join in JOINS.items():
      for case, (f, leaves) in programs(shapes, join).items():
        us = 1e6 * common.median_call_seconds(f, (leaves,), calls, reps)
        rows.append({"model": model, "elements": int(sum(np.prod(s) for s in shapes)),
                     "join": name, "leaves": case, "median_us": us})
        print(f"{model:6s} {case:9s} {name:12s} {us:9.1f} us", flush=True)
  common.save("concat", {"device": common.device_info(), "reps": reps, "calls": calls,
                         "rows": rows})
  return rows


if __name__ == "__main__":
  main()
