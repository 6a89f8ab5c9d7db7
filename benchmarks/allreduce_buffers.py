"""What an all-reduce of several buffers costs on forced CPU devices.

A ``lax.psum`` of a tuple (or a pytree) is one all-reduce op with one operand per
leaf. This script times, on 8 forced CPU devices with shard_map, a chain of 20
all-reduces of N float32 values written either as one buffer or as a tuple of N
one-element buffers, and reports microseconds per all-reduce (medians over repetitions;
``results/allreduce_buffers.json``). It is why wagrad's collectives
(``collectives.fused``) and its exchanges send one flat buffer per dtype.

    python benchmarks/allreduce_buffers.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

CHAIN = 20


def program(mesh, n, as_tuple):
  def body(x):
    for _ in range(CHAIN):
      if as_tuple:
        x = jnp.concatenate(lax.psum(tuple(x[i:i + 1] for i in range(n)), "w"))
      else:
        x = lax.psum(x, "w")
      x = x * 0.125
    return x
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("w"), out_specs=P("w")))


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--reps", type=int, default=None)
  args = ap.parse_args(argv)
  reps = args.reps or (3 if args.quick else 7)
  calls = 5 if args.quick else 20
  mesh = Mesh(np.array(jax.devices()), ("w",))
  d = len(jax.devices())
  rows = []
  for n in (1, 2, 4, 8):
    for as_tuple in ((False, True) if n > 1 else (False,)):
      f = program(mesh, n, as_tuple)
      x = jnp.ones(d * n, jnp.float32)
      seconds = common.median_call_seconds(f, (x,), calls, reps)
      hlo = f.lower(x).compile().as_text()
      row = {"values": n, "buffers": n if as_tuple else 1,
             "us_per_all_reduce": 1e6 * seconds / CHAIN,
             "all_reduce_ops": hlo.count(" all-reduce(")}
      rows.append(row)
      print(f"{n} values in {row['buffers']} buffer(s): {row['us_per_all_reduce']:.1f} us "
            f"per all-reduce ({row['all_reduce_ops']} all-reduce ops)", flush=True)
  common.save("allreduce_buffers", {"device": common.device_info(), "devices": d,
                                    "chain": CHAIN, "reps": reps, "rows": rows})
  return rows


if __name__ == "__main__":
  main()
