"""Scaling: simulated workers K = 1..64 with vmap on one device (time per step and the
compiled program's memory), and devices D = 1..8 with shard_map for K = 8 workers.

    python benchmarks/scaling.py [--quick]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402

import wagrad  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from digits_lib import MLP  # noqa: E402


LR = 0.05


def setup(K, batch, hidden):
  model = MLP(hidden)
  p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(K, batch, 64)).astype(np.float32)
  y = rng.integers(0, 10, size=(K, batch)).astype(np.int32)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
  return p0, x, y, loss_fn


class Step:
  """A training step ``state -> state`` with its batch bound (the batch is an argument,
  not part of the state, so only the state is donated). ``lower`` and ``num_traces``
  reach the jitted function underneath."""

  def __init__(self, f, *data):
    self.f, self.data = f, data

  def __call__(self, *state):
    return self.f(*state, *self.data)

  def lower(self, *state):
    return self.f.lower(*state, *self.data)

  def num_traces(self):
    return self.f.num_traces() if hasattr(self.f, "num_traces") else None


def wagrad_variant(runner, tx, p0, x, y, loss_fn, donate=True, grad_point=None):
  """A wagrad step through ``Runner.map``: state (params, opt_state), donated unless
  ``donate=False``; ``grad_point(params, state)``: where the gradient is taken (EAMSGD's
  look-ahead point)."""
  def step(p, s, x, y):
    at = p if grad_point is None else grad_point(p, s)
    loss, g = jax.value_and_grad(loss_fn)(at, x, y)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s
  f = runner.map(step, donate_argnums=(0, 1) if donate else ())
  return Step(f, runner.put(x), runner.put(y)), (runner.replicate(p0), runner.init(tx, p0))


def measure(runner, tau, steps, reps, batch, hidden):
  p0, x, y, loss_fn = setup(runner.num_workers, batch, hidden)
  tx = wagrad.model_averaging(optax.sgd(0.05), tau, axis_name=runner.axis_name)
  f, st = wagrad_variant(runner, tx, p0, x, y, loss_fn)
  st = common.warm_up(f, st)
  ts = []
  for _ in range(reps):
    dt, st = common.time_steps(f, st, steps)
    ts.append(dt)
  mem = f.lower(*st).compile().memory_analysis()
  mem_bytes = None
  if mem is not None:
    mem_bytes = int(getattr(mem, "argument_size_in_bytes", 0) + getattr(mem, "temp_size_in_bytes", 0)
                    + getattr(mem, "output_size_in_bytes", 0))
  return {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * min(ts),
          "max_ms": 1e3 * max(ts), "program_bytes": mem_bytes, "num_traces": f.num_traces()}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  steps, reps = (20, 3) if args.quick else (60, 5)
  batch, hidden, tau = 32, 256, 4
  vmap_rows = []
  for K in (1, 2, 4, 8, 16, 32, 64):
    row = {"workers": K, **measure(wagrad.Runner("vmap", K), tau, steps, reps, batch, hidden)}
    row["ms_per_worker"] = row["median_ms"] / K
    vmap_rows.append(row)
    print(f"vmap K={K:3d}: {row['median_ms']:8.3f} ms/step  {row['ms_per_worker']:.3f} ms/worker  "
          f"memory {row['program_bytes']}", flush=True)
  shard_rows = []
  for D in (1, 2, 4, 8):
    row = {"devices": D, "workers": 8,
           **measure(wagrad.Runner("shard_map", 8, num_devices=D), tau, steps, reps, batch, hidden)}
    shard_rows.append(row)
    print(f"shard_map D={D}, K=8: {row['median_ms']:8.3f} ms/step", flush=True)
  data = {"device": common.device_info(), "algorithm": f"model_averaging tau={tau}",
          "batch_per_worker": batch, "hidden": hidden, "vmap": vmap_rows, "shard_map": shard_rows}
  common.save("scaling", data)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axs = plt.subplots(1, 2, figsize=(10, 4))
  axs[0].loglog([r["workers"] for r in vmap_rows], [r["median_ms"] for r in vmap_rows], "o-")
  axs[0].set_xlabel("simulated workers K (vmap, one device)")
  axs[0].set_ylabel("ms per step")
  axs[0].grid(alpha=0.3)
  axs[1].plot([r["devices"] for r in shard_rows], [r["median_ms"] for r in shard_rows], "o-")
  axs[1].set_xlabel("devices D (shard_map, K=8)")
  axs[1].set_ylabel("ms per step")
  axs[1].grid(alpha=0.3)
  fig.suptitle(f"scaling, {data['device']['platform']}")
  fig.tight_layout()
  path = os.path.join(common.OUT, "scaling.png")
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")
  return data


if __name__ == "__main__":
  main()
