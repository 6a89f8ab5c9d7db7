"""Overhead at realistic sizes: each periodic transform against a short hand-written
version of the same math, in the same process, interleaved, as paired ratios.

For each model size (about 0.27M parameters -- a ResNet-20's count --, 1M and 10M; an
MLP 256 -> h -> h -> 10), each backend (``shard_map`` over 8 devices, ``vmap`` with 8
workers on one device) and each tau in (1, 4, 16), every variant below runs the same
training step (same loss, same ``optax.sgd`` inner step, donated state, each step
waited for) through ``wagrad.Runner.map``:

* ``local``: local SGD, no communication (the floor), written by hand;
* ``optax local``: the same step through optax's update API (``optax.sgd`` updates,
  then ``optax.apply_updates``): what returning updates instead of parameters costs;
* ``hand <algo>``: the algorithm as one writes it by hand on plain pytrees -- one
  ``lax.cond`` every tau steps, ``lax.pmean`` / ``lax.psum`` of the whole tree, no
  metrics, no guards against non-finite workers (:func:`hand_step`);
* ``wagrad <algo>``: the transform, with ``wagrad.apply_updates``.

Algorithms: model averaging, EASGD (alpha = 0.9 / 8), LSGD (pull 0.1, proximal 0.1,
running loss over tau steps), WASGD (Boltzmann weights of the round's mean loss,
moving rate 1) and DiLoCo (outer Nesterov SGD 0.7 / 0.9 on the pseudo-gradient; inner
SGD here). Reported per (size, backend, tau, algo): median ms per step and the median
over repetitions of the paired ratio wagrad / hand (both timed in the same repetition,
so both see the same machine load), with its quartiles. From the compiled programs:
parameter-sized copies (f32 ``copy`` ops of at least a tenth of the parameters) and
collective bytes (entry computation = every step, branches = exchange steps).

    python benchmarks/overhead.py                 # all sizes (long on 2 cores)
    python benchmarks/overhead.py --quick         # 0.27M and 1M, fewer repetitions
    python benchmarks/overhead.py --sizes 1M --backends vmap --taus 1

Runs unchanged on a GPU (no CPU-only flag is set there; common.py forces 8 host
devices only on the CPU platform); the JSON's name says the platform.
"""

import argparse
import time
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import wagrad  # noqa: E402

LR = 0.05
K = 8
IN, OUT, BATCH = 256, 10, 32
SIZES = {"0.27M": 400, "1M": 880, "10M": 3030}       # name -> hidden width
EASGD_ALPHA = 0.9 / K
LSGD_PULL, LSGD_PROXIMAL = 0.1, 0.1
DILOCO_LR, DILOCO_MOMENTUM = 0.7, 0.9
ALGOS = ("averaging", "easgd", "lsgd", "wasgd", "diloco")


def init_params(hidden, seed=0):
  rng = np.random.default_rng(seed)
  dims = [(IN, hidden), (hidden, hidden), (hidden, OUT)]
  return {f"layer{i}": {"w": (rng.normal(size=d) / np.sqrt(d[0])).astype(np.float32),
                        "b": np.zeros(d[1], np.float32)} for i, d in enumerate(dims)}


def loss_fn(p, x, y):
  h = x
  for i in range(3):
    h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
    if i < 2:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def wagrad_tx(algo, tau):
  sgd = optax.sgd(LR)
  return {"averaging": lambda: wagrad.model_averaging(sgd, tau),
          "easgd": lambda: wagrad.easgd(sgd, tau, alpha=EASGD_ALPHA),
          "lsgd": lambda: wagrad.lsgd(sgd, tau, pull=LSGD_PULL, proximal=LSGD_PROXIMAL),
          "wasgd": lambda: wagrad.wasgd(sgd, tau),
          "diloco": lambda: wagrad.model_averaging(
              sgd, tau, outer_optimizer=optax.sgd(DILOCO_LR, momentum=DILOCO_MOMENTUM,
                                                  nesterov=True))}[algo]()


def optax_local_variant(r, p0):
  """Local SGD through optax's update API, no communication (the ``optax local`` row)."""
  tx = optax.sgd(LR)

  def step(p, s, x, y):
    u, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
    return optax.apply_updates(p, u), s
  return r.map(step, donate_argnums=(0, 1)), (r.replicate(p0), r.init(tx, p0))


def wagrad_variant(r, algo, tau, p0):
  tx = wagrad_tx(algo, tau)

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s
  return r.map(step, donate_argnums=(0, 1)), (r.replicate(p0), r.init(tx, p0))


def hand_step(algo, tau, ax):
  """The hand-written per-worker step ``(p, state, x, y) -> (p, state)``; the state's
  shared part (count, center, leader copy, outer state) is wrapped in ``wagrad.Shared``
  so that the runner does not stack it (as a transform's shared state)."""
  tm = jax.tree_util.tree_map
  outer = optax.sgd(DILOCO_LR, momentum=DILOCO_MOMENTUM, nesterov=True)

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    xh = tm(lambda a, b: a - LR * b, p, g)
    sh, mine = s
    count, extra = sh.value
    ex = (count + 1) % tau == 0 if algo != "local" else False
    if algo == "local":
      new = xh
    elif algo == "averaging":
      new = lax.cond(ex, lambda t: lax.pmean(t, ax), lambda t: t, xh)
    elif algo == "easgd":
      def exchange(c):
        diff = tm(lambda a, b: a - b, p, c)
        tot = lax.psum(diff, ax)
        return (tm(lambda a, d: a - EASGD_ALPHA * d, xh, diff),
                tm(lambda a, t: a + EASGD_ALPHA * t, c, tot))
      new, extra = lax.cond(ex, exchange, lambda c: (xh, c), extra)
    elif algo == "lsgd":
      L = extra
      ring, n = mine
      ring = ring.at[n % tau].set(loss)
      n = n + 1
      run = jnp.sum(jnp.where(jnp.arange(tau) < jnp.minimum(n, tau), ring, 0.0)) / \
          jnp.minimum(n, tau)
      xh = tm(lambda a, l: a - (LSGD_PROXIMAL / tau) * (a - l), xh, L)

      def exchange(xh, L):
        me = lax.axis_index(ax)
        leader = lax.pmin(jnp.where(run == lax.pmin(run, ax), me, K), ax)
        L = lax.psum(tm(lambda a: jnp.where(me == leader, a, 0.0), xh), ax)
        return tm(lambda a, l: a - LSGD_PULL * (a - l), xh, L), L
      new, extra = lax.cond(ex, exchange, lambda xh, L: (xh, L), xh, L)
      mine = (ring, n)
    elif algo == "wasgd":
      lsum, n = mine
      lsum, n = lsum + loss, n + 1

      def exchange(xh):
        l = lsum / n
        w = jnp.exp(-(l - lax.pmin(l, ax)))
        w = w / lax.psum(w, ax)
        return lax.psum(tm(lambda a: w * a, xh), ax)
      new = lax.cond(ex, exchange, lambda t: t, xh)
      mine = (jnp.where(ex, 0.0, lsum), jnp.where(ex, 0, n))
    else:  # diloco
      x_glob, ostate = extra

      def exchange(x_glob, ostate):
        xbar = lax.pmean(xh, ax)
        ou, ostate = outer.update(tm(lambda a, b: a - b, x_glob, xbar), ostate, x_glob)
        x_glob = optax.apply_updates(x_glob, ou)
        return x_glob, x_glob, ostate
      new, x_glob, ostate = lax.cond(ex, exchange, lambda g_, o: (xh, g_, o), x_glob, ostate)
      extra = (x_glob, ostate)
    return new, (wagrad.Shared((count + 1, extra)), mine)
  return step


def hand_variant(r, algo, tau, p0):
  cp = lambda t: jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)  # noqa: E731
  extra = {"local": None, "averaging": None, "easgd": cp(p0), "lsgd": cp(p0), "wasgd": None,
           "diloco": (cp(p0), optax.sgd(DILOCO_LR, momentum=DILOCO_MOMENTUM,
                                        nesterov=True).init(cp(p0)))}[algo]
  mine = {"lsgd": (np.zeros((K, tau), np.float32), np.zeros((K,), np.int32)),
          "wasgd": (np.zeros((K,), np.float32), np.zeros((K,), np.int32))}.get(algo)
  state = (wagrad.Shared((jnp.int32(0), extra)), mine)
  f = r.map(hand_step(algo, tau, r.axis_name), donate_argnums=(0, 1))
  return f, (r.replicate(p0), r.replicate(state) if mine is None else
             (r.replicate(state[0]), r.put(mine)))


def param_copies(hlo, n_params):
  """f32 ``copy`` ops of at least a tenth of the parameters, anywhere in the program."""
  import re
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"= f32\[([\d,]*)\]\S* copy\(", hlo)]
  return sum(k * 10 >= n_params for k in sizes)


def run(size, backend, taus, algos, steps, reps):
  hidden = SIZES[size]
  p0 = init_params(hidden)
  n_params = int(sum(a.size for a in jax.tree_util.tree_leaves(p0)))
  r = wagrad.Runner(backend, K)
  rng = np.random.default_rng(1)
  x = r.put(rng.normal(size=(K, BATCH, IN)).astype(np.float32))
  y = r.put(rng.integers(0, OUT, size=(K, BATCH)).astype(np.int32))
  variants = {"local": hand_variant(r, "local", 1, p0),
              "optax local": optax_local_variant(r, p0)}
  for tau in taus:
    for algo in algos:
      variants[f"hand {algo} tau={tau}"] = hand_variant(r, algo, tau, p0)
      variants[f"wagrad {algo} tau={tau}"] = wagrad_variant(r, algo, tau, p0)
  states, rows = {}, {}
  for name, (f, st) in variants.items():  # compile, read the program, warm up
    hlo = f.lower(*st, x, y).compile().as_text()
    rows[name] = {"variant": name, "param_copies": param_copies(hlo, n_params),
                  "collective_bytes": common.collective_bytes(hlo)}
    for _ in range(2):
      st = jax.block_until_ready(f(*st, x, y))
    states[name] = st
  times = {n: [] for n in variants}
  for rep in range(reps):  # interleaved repetitions
    for name, (f, _) in variants.items():
      st = states[name]
      t0 = time.perf_counter()
      for _ in range(steps):
        st = jax.block_until_ready(f(*st, x, y))
      times[name].append((time.perf_counter() - t0) / steps)
      states[name] = st
    print(f"  {size} {backend}: rep {rep + 1}/{reps}", flush=True)
  for name, (f, _) in variants.items():
    row = rows[name]
    row["median_ms"] = 1e3 * float(np.median(times[name]))
    row["x_local"] = float(np.median(np.asarray(times[name]) / np.asarray(times["local"])))
    if name.startswith("wagrad "):
      hand = name.replace("wagrad ", "hand ")
      ratios = np.asarray(times[name]) / np.asarray(times[hand])
      row["x_hand_q25_q50_q75"] = [float(np.percentile(ratios, q)) for q in (25, 50, 75)]
      row["hand_param_copies"] = rows[hand]["param_copies"]
    row["num_traces"] = f.num_traces() if hasattr(f, "num_traces") else None
    print(f"  {name:28s} {row['median_ms']:9.2f} ms  x{row['x_local']:.2f} local"
          + (f"  x{row['x_hand_q25_q50_q75'][1]:.3f} hand" if "x_hand_q25_q50_q75" in row
             else "") + f"  copies {row['param_copies']}", flush=True)
  return {"size": size, "params": n_params, "hidden": hidden, "backend": backend,
          "batch_per_worker": BATCH, "workers": K, "steps_per_rep": steps, "reps": reps,
          "rows": list(rows.values())}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--sizes", default=None, help="comma-separated: " + ", ".join(SIZES))
  ap.add_argument("--backends", default="shard_map,vmap")
  ap.add_argument("--taus", default="1,4,16")
  ap.add_argument("--algos", default=",".join(ALGOS))
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--out", default=None, help="JSON name (default: overhead_<platform>)")
  args = ap.parse_args(argv)
  sizes = (args.sizes or ("0.27M,1M" if args.quick else ",".join(SIZES))).split(",")
  for s in sizes:
    if s not in SIZES:
      raise SystemExit(f"unknown size {s!r}; choose from {list(SIZES)}")
  algos = [a for a in args.algos.split(",") if a]
  for a in algos:
    if a not in ALGOS:
      raise SystemExit(f"unknown algorithm {a!r}; choose from {ALGOS}")
  taus = [int(t) for t in args.taus.split(",")]
  info = common.device_info()
  data = {"device": info, "runs": []}
  for size in sizes:
    for backend in args.backends.split(","):
      steps = args.steps or {"0.27M": 32, "1M": 16, "10M": 4}[size]
      reps = args.reps or (5 if args.quick else 9)
      print(f"== {size} on {backend}: {reps} x {steps} steps per variant", flush=True)
      data["runs"].append(run(size, backend, taus, algos, steps, reps))
      common.save(args.out or f"overhead_{info['platform']}", data)  # after each run
  plot(data, args.out or f"overhead_{info['platform']}")
  return data


def plot(data, name):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = data["runs"]
  fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False,
                           sharey=True)
  for ax, run_ in zip(axes[0], runs):
    rows = [r for r in run_["rows"] if "x_hand_q25_q50_q75" in r]
    labels = [r["variant"].removeprefix("wagrad ") for r in rows]
    q = np.asarray([r["x_hand_q25_q50_q75"] for r in rows])
    ax.barh(labels, q[:, 1], xerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.05, color="tab:red", lw=0.8, ls="--")
    ax.invert_yaxis()
    ax.set_xlabel("wagrad / hand-written (paired median)")
    ax.set_title(f"{run_['size']} ({run_['params']:,}), {run_['backend']}", fontsize=9)
  fig.suptitle(f"{data['device']['platform']} x{data['device']['device_count']}, 8 workers, "
               "donated state (red: the 1.05 target)", fontsize=10)
  fig.tight_layout()
  path = os.path.join(common.OUT, name + ".png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
