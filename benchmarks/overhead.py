"""Overhead, communication volume and compile-once benchmark.

For each algorithm: time per training step of a Flax MLP (digits-sized input) on
8 workers over 8 (forced CPU) devices with shard_map, against, in the same process and
interleaved: (a) a hand-written shard_map step doing the same math with raw ``jax.lax``
collectives (same loss, same ``optax.sgd`` step, a ``lax.pmean`` of the parameters in a
``lax.cond`` every tau steps; also written "as updates", the way an optax transform
must: the cond returns ``x - p`` and ``optax.apply_updates`` adds it), (b) local SGD
with no communication at all, (c) synchronous all-reduce SGD. wagrad's model averaging
runs with ``exact=True`` (the default: it carries x_global for exact assignment) and
``exact=False``. Medians over interleaved repetitions, with the spread.
Bytes moved by collectives are read from the compiled HLO (entry computation = every
step; conditional branches = exchange steps).

Two model sizes: ``tiny`` (hidden 256, batch 32 per worker: a step is almost all fixed
per-operation cost, so it shows what wagrad adds in absolute terms) and ``small``
(hidden 1024, batch 128 per worker: the step does real work).

    python benchmarks/overhead.py            # full size, both models
    python benchmarks/overhead.py --quick    # reduced size (part of run_all.py)
    python benchmarks/overhead.py --targets  # only the variants #8's targets compare,
                                             # 25 repetitions, bootstrap intervals
                                             # (writes overhead_targets.json)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import wagrad  # noqa: E402
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


def wagrad_variant(runner, tx, p0, x, y, loss_fn):
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s, x, y
  f = runner.map(step)
  state = (runner.replicate(p0), runner.init(tx, p0), runner.put(x), runner.put(y))
  return f, state


def hand_variant(runner, p0, x, y, loss_fn, tau, as_updates=False):
  """Raw lax: the same loss and optax.sgd step as the wagrad variants; then a pmean of
  the params every tau steps (tau=0: never; tau=-1: gradients averaged every step, i.e.
  synchronous SGD). ``as_updates``: the averaging written as an optax-style transform
  would be -- the cond returns updates (``pmean(x_half) - p`` or ``x_half - p``) and
  ``optax.apply_updates`` adds them -- instead of returning the new parameters."""
  mesh = runner.mesh
  sgd = optax.sgd(LR)

  def body(p, count, x, y):
    p, x, y = jax.tree_util.tree_map(lambda a: a[0], (p, x, y))
    _, g = jax.value_and_grad(loss_fn)(p, x, y)
    if tau == -1:
      g = jax.tree_util.tree_map(lambda a: lax.pmean(a, "workers"), g)
    u, _ = sgd.update(g, sgd.init(p), p)
    if as_updates:
      x_half = optax.apply_updates(p, u)
      u = lax.cond((count + 1) % tau == 0,
                   lambda x: jax.tree_util.tree_map(lambda a: lax.pmean(a, "workers"), x),
                   lambda x: x, x_half)
      u = jax.tree_util.tree_map(lambda a, b: a - b, u, p)
    p = optax.apply_updates(p, u)
    if tau > 0 and not as_updates:
      p = lax.cond((count + 1) % tau == 0,
                   lambda p: jax.tree_util.tree_map(lambda a: lax.pmean(a, "workers"), p),
                   lambda p: p, p)
    return jax.tree_util.tree_map(lambda a: a[None], p), count + 1, x[None], y[None]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("workers"), P(), P("workers"), P("workers")),
                            out_specs=(P("workers"), P(), P("workers"), P("workers")),
                            check_vma=False))
  state = (runner.replicate(p0), jnp.int32(0), runner.put(x), runner.put(y))
  return f, state


MODELS = {"tiny": (32, 256), "small": (128, 1024)}  # name -> (batch per worker, hidden)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
  ap.add_argument("--targets", action="store_true",
                  help="only sync SGD and averaging against their hand-written steps and "
                       "local SGD, more repetitions, 90%% bootstrap intervals")
  args = ap.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  for m in models:
    if m not in MODELS:
      raise SystemExit(f"unknown model {m!r}; choose from {sorted(MODELS)}")
  data = {"device": common.device_info(), "workers": 8, "models": {}}
  for m in models:
    batch, hidden = MODELS[m]
    steps = args.steps or {"tiny": 48 if args.quick else 160, "small": 16 if args.quick else 48}[m]
    reps = args.reps or (5 if args.quick else 25 if args.targets else 9)
    print(f"== model {m}: hidden {hidden}, batch {batch} per worker, {reps} x {steps} steps",
          flush=True)
    data["models"][m] = run_model(batch, hidden, steps, reps, targets=args.targets)
  if args.targets:
    common.save("overhead_targets", data)
    return data
  common.save("overhead", data)
  plot(data)
  return data


def run_model(batch, hidden, steps, reps, K=8, targets=False):
  runner = wagrad.Runner("shard_map", K)
  p0, x, y, loss_fn = setup(K, batch, hidden)
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(p0))
  sgd = optax.sgd(LR)
  variants = {
      "local_sgd (no comm)": hand_variant(runner, p0, x, y, loss_fn, 0),
      "hand sync_sgd": hand_variant(runner, p0, x, y, loss_fn, -1),
      "wagrad sync_sgd": wagrad_variant(runner, wagrad.sync_sgd(sgd), p0, x, y, loss_fn),
  }
  taus = (1, 4, 16)
  for tau in taus:
    variants[f"hand averaging tau={tau}"] = hand_variant(runner, p0, x, y, loss_fn, tau)
    variants[f"hand averaging (as updates) tau={tau}"] = hand_variant(
        runner, p0, x, y, loss_fn, tau, as_updates=True)
    variants[f"wagrad model_averaging tau={tau}"] = wagrad_variant(
        runner, wagrad.model_averaging(sgd, tau), p0, x, y, loss_fn)
    variants[f"wagrad model_averaging exact=False tau={tau}"] = wagrad_variant(
        runner, wagrad.model_averaging(sgd, tau, exact=False), p0, x, y, loss_fn)
  for name, factory in ({} if targets else extra_algorithms()).items():
    for tau in taus:
      variants[f"wagrad {name} tau={tau}"] = wagrad_variant(runner, factory(sgd, tau), p0, x, y, loss_fn)

  # compile + warm up every variant (not timed)
  states = {}
  for name, (f, st) in variants.items():
    for _ in range(3):
      st = jax.block_until_ready(f(*st))
    states[name] = st
  times = {n: [] for n in variants}
  for r in range(reps):  # interleaved repetitions
    for name, (f, _) in variants.items():
      dt, states[name] = common.time_steps(f, states[name], steps)
      times[name].append(dt)
    print(f"rep {r + 1}/{reps} done", flush=True)

  med = {n: float(np.median(v)) for n, v in times.items()}
  base = med["local_sgd (no comm)"]

  def paired(a, b):
    """Median and quartiles over repetitions of t_a / t_b within the same repetition:
    the interleaving makes both see the same machine load, so this is much tighter
    than a ratio of medians on a noisy machine."""
    r = np.asarray(times[a]) / np.asarray(times[b])
    return [float(np.percentile(r, q)) for q in (25, 50, 75)]

  def median_interval(a, b):
    """90% bootstrap interval of the median paired ratio (seeded resampling)."""
    r = np.asarray(times[a]) / np.asarray(times[b])
    rng = np.random.default_rng(0)
    meds = np.median(r[rng.integers(0, len(r), (2000, len(r)))], axis=1)
    return [float(np.percentile(meds, 5)), float(np.percentile(meds, 95))]

  rows = []
  for name in variants:
    row = {"variant": name, "median_ms": 1e3 * med[name],
           "min_ms": 1e3 * min(times[name]), "max_ms": 1e3 * max(times[name]),
           "ratio_to_local_sgd": med[name] / base}
    if name.startswith("wagrad model_averaging"):
      tau = int(name.rsplit("=", 1)[1])
      hand = f"hand averaging tau={tau}"
      row["ratio_to_hand"] = med[name] / med[hand]
      row["paired_ratio_to_hand_q25_q50_q75"] = paired(name, hand)
      row["paired_ratio_to_hand_as_updates_q25_q50_q75"] = paired(
          name, f"hand averaging (as updates) tau={tau}")
      row["median_ratio_to_hand_90ci"] = median_interval(name, hand)
      row["median_ratio_to_hand_as_updates_90ci"] = median_interval(
          name, f"hand averaging (as updates) tau={tau}")
      row["median_ratio_to_local_sgd_90ci"] = median_interval(name, "local_sgd (no comm)")
      row["paired_ratio_to_local_sgd_q25_q50_q75"] = paired(name, "local_sgd (no comm)")
      row["target_ratio_to_local_sgd"] = 1 + 1 / tau
    if name.startswith("hand averaging"):
      row["paired_ratio_to_local_sgd_q25_q50_q75"] = paired(name, "local_sgd (no comm)")
      row["median_ratio_to_local_sgd_90ci"] = median_interval(name, "local_sgd (no comm)")
      row["target_ratio_to_local_sgd"] = 1 + 1 / int(name.rsplit("=", 1)[1])
    if name == "wagrad sync_sgd":
      row["ratio_to_hand"] = med[name] / med["hand sync_sgd"]
      row["paired_ratio_to_hand_q25_q50_q75"] = paired(name, "hand sync_sgd")
      row["median_ratio_to_hand_90ci"] = median_interval(name, "hand sync_sgd")
    f = variants[name][0]
    if hasattr(f, "num_traces"):
      row["num_traces"] = f.num_traces()
    row["collective_bytes"] = common.collective_bytes(f.lower(*states[name]).compile().as_text())
    rows.append(row)
    print(f"{name:36s} {row['median_ms']:7.3f} ms  x{row['ratio_to_local_sgd']:.2f} local"
          + (f"  x{row['ratio_to_hand']:.3f} hand" if "ratio_to_hand" in row else "")
          + (f"  traces={row.get('num_traces')}" if "num_traces" in row else ""))
  return {"batch_per_worker": batch, "hidden": hidden, "params": int(n_params),
          "param_bytes": int(4 * n_params), "steps_per_rep": steps, "reps": reps, "rows": rows}


def extra_algorithms():
  """Algorithm families present in this wagrad build: name -> factory(inner, tau)."""
  out = {}
  if hasattr(wagrad, "easgd"):
    out["easgd"] = lambda inner, tau: wagrad.easgd(inner, tau)
  if hasattr(wagrad, "lsgd"):
    out["lsgd"] = lambda inner, tau: wagrad.lsgd(inner, tau)
  if hasattr(wagrad, "wasgd"):
    out["wasgd"] = lambda inner, tau: wagrad.wasgd(inner, tau)
  return out


def plot(data):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = data["models"]
  n = max(len(m["rows"]) for m in models.values())
  fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 0.35 * n + 1.4),
                           squeeze=False)
  for ax, (name, m) in zip(axes[0], models.items()):
    rows = m["rows"]
    ax.barh([r["variant"] for r in rows], [r["median_ms"] for r in rows],
            xerr=[[r["median_ms"] - r["min_ms"] for r in rows],
                  [r["max_ms"] - r["median_ms"] for r in rows]])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median, min-max)")
    ax.set_title(f"{name}: {m['params']} params, batch {m['batch_per_worker']}/worker")
  fig.suptitle(f"8 workers, {data['device']['platform']} x{data['device']['device_count']}")
  fig.tight_layout()
  path = os.path.join(common.OUT, "overhead.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
