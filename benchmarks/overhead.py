"""Overhead, communication volume and compile-once benchmark.

For each algorithm: time per training step of a Flax MLP (digits-sized input) on
8 workers over 8 (forced CPU) devices with shard_map, against, in the same process and
interleaved: (a) a hand-written shard_map step doing the same math with raw ``jax.lax``
collectives, each called once on a whole tree as one writes it by hand (same loss, same
``optax.sgd`` step; for averaging a ``lax.pmean`` of the parameters in a ``lax.cond``
every tau steps, for EASGD the elastic exchange with a replicated center, for LSGD the
running-loss election, one-hot broadcast and pulls; each also written "as updates",
the way an optax transform must: the new parameters become
``x_new - p`` and ``optax.apply_updates`` adds it), (b) local SGD with no communication
at all, (c) synchronous all-reduce SGD. wagrad's model averaging runs with
``exact=True`` (the default: it carries x_global for exact assignment) and
``exact=False``. WASGD, WP-SGD, EAMSGD, DOWNPOUR and DiLoCo run without a hand-written
counterpart (see :func:`extra_algorithms` for what is not timed here). Medians over
interleaved repetitions, paired ratios, the spread.

Every step donates its state (parameters, optimizer / algorithm state) as a training
loop does (``donate_argnums``); ``--no-donate`` measures without, where every buffer the
state carries is copied on every step. Bytes moved by collectives are read from the
compiled HLO (entry computation = every step; conditional branches = exchange steps).

Two model sizes: ``tiny`` (hidden 256, batch 32 per worker: a step is almost all fixed
per-operation cost, so it shows what wagrad adds in absolute terms) and ``small``
(hidden 1024, batch 128 per worker: the step does real work).

    python benchmarks/overhead.py            # full size, both models
    python benchmarks/overhead.py --quick    # reduced size (part of run_all.py)
    python benchmarks/overhead.py --targets  # only the algorithms with a hand-written
                                             # equivalent, 25 repetitions, bootstrap
                                             # intervals (overhead_targets.json)
    python benchmarks/overhead.py --targets --processes 3
                                             # the same, each family in 3 fresh
                                             # processes (what README quotes)
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

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


EASGD_BETA = 0.9                 # wagrad.easgd's defaults: alpha = beta / p
LSGD_PULL, LSGD_PROXIMAL = 0.1, 0.1   # wagrad.lsgd's defaults (avg_size = tau)


def hand_variant(runner, p0, x, y, loss_fn, tau, as_updates=False, kind="averaging",
                 donate=True):
  """Raw lax and the same loss and ``optax.sgd`` step as the wagrad variants.

  ``kind``: ``"averaging"`` (a ``lax.pmean`` of the params in a ``lax.cond`` every tau
  steps; tau=0: never, i.e. local SGD; tau=-1: gradients averaged every step, i.e.
  synchronous SGD), ``"easgd"`` (the elastic exchange every tau steps, center
  replicated, alpha = 0.9 / p) or ``"lsgd"`` (ring buffer of the last tau losses,
  proximal pull every step, leader = argmin of the running mean elected with
  ``lax.pmin`` and broadcast by a one-hot ``lax.psum`` every tau steps). No metrics, no
  guards against non-finite workers: the math only. ``as_updates``: written the way an
  optax transform has to be -- the new parameters become updates ``x_new - p`` that
  ``optax.apply_updates`` adds -- instead of being returned straight out of the cond.
  The state (params, count and the algorithm's buffers) is donated unless
  ``donate=False``.
  """
  sgd = optax.sgd(LR)
  tm = jax.tree_util.tree_map
  K = runner.num_workers
  pmean = lambda t: lax.pmean(t, "workers")  # noqa: E731  (one all-reduce of the tree)

  def body(p, count, extra, x, y):
    p, x, y = tm(lambda a: a[0], (p, x, y))  # this device's worker
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    if tau == -1:
      g = pmean(g)
    u, _ = sgd.update(g, sgd.init(p), p)
    xh = optax.apply_updates(p, u)
    ex = (count + 1) % max(tau, 1) == 0
    if kind == "averaging":
      new = xh if tau <= 0 else lax.cond(ex, pmean, lambda t: t, xh)
    elif kind == "easgd":
      a = EASGD_BETA / K
      center = extra

      def exchange(p, xh, c):
        diff = tm(lambda x_, c_: x_ - c_, p, c)
        tot = lax.psum(diff, "workers")
        return (tm(lambda x_, d: x_ - a * d, xh, diff),
                tm(lambda c_, t: c_ + a * t, c, tot))
      new, extra = lax.cond(ex, exchange, lambda p, xh, c: (xh, c), p, xh, center)
    else:  # lsgd
      L, ring, n = extra[0], extra[1][0], extra[2][0]
      ring = ring.at[n % tau].set(loss)
      n = n + 1
      m = jnp.minimum(n, tau)
      run = jnp.sum(jnp.where(jnp.arange(tau) < m, ring, 0.0)) / m
      coef = LSGD_PROXIMAL / tau
      xh = tm(lambda x_, l_: x_ - coef * (x_ - l_), xh, L)

      def exchange(xh, L):
        lmin = lax.pmin(run, "workers")
        me = lax.axis_index("workers")
        leader = lax.pmin(jnp.where(run == lmin, me, K), "workers")
        L = lax.psum(tm(lambda x_: jnp.where(me == leader, x_, 0.0), xh), "workers")
        return tm(lambda x_, l_: x_ - LSGD_PULL * (x_ - l_), xh, L), L
      new, L = lax.cond(ex, exchange, lambda xh, L: (xh, L), xh, L)
      extra = (L, ring[None], n[None])
    if as_updates:
      new = optax.apply_updates(p, tm(lambda a, b: a - b, new, p))
    return tm(lambda a: a[None], new), count + 1, extra

  extra_spec = {"averaging": None, "easgd": P(), "lsgd": (P(), P("workers"), P("workers"))}[kind]
  f = jax.jit(jax.shard_map(body, mesh=runner.mesh,
                            in_specs=(P("workers"), P(), extra_spec, P("workers"), P("workers")),
                            out_specs=(P("workers"), P(), extra_spec), check_vma=False),
              donate_argnums=(0, 1, 2) if donate else ())
  def rep(t):  # replicated, on fresh buffers: the state is donated (device_put may reuse
    # the source's buffer for one of the shards, even with may_alias=False)
    return jax.device_put(tm(jnp.copy, t), jax.sharding.NamedSharding(runner.mesh, P()))
  extra = {"averaging": None, "easgd": rep(p0),
           "lsgd": (rep(p0), runner.put(np.zeros((K, max(tau, 1)), np.float32)),
                    runner.put(np.zeros((K,), np.int32)))}[kind]
  state = (runner.replicate(p0), rep(jnp.int32(0)), extra)
  return Step(f, runner.put(x), runner.put(y)), state


MODELS = {"tiny": (32, 256), "small": (128, 1024)}  # name -> (batch per worker, hidden)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
  ap.add_argument("--targets", action="store_true",
                  help="only the algorithms with a hand-written equivalent (sync SGD, "
                       "averaging, EASGD, LSGD) and local SGD, more repetitions, 90%% "
                       "bootstrap intervals")
  ap.add_argument("--no-donate", action="store_true",
                  help="do not donate the state to the step (every buffer the state "
                       "carries is then copied on every step; results get a _nodonate "
                       "suffix)")
  ap.add_argument("--family", default=",".join(FAMILIES),
                  help="comma-separated subset of: " + ", ".join(FAMILIES))
  ap.add_argument("--processes", type=int, default=0,
                  help="with --targets: measure each family in this many fresh processes "
                       "(one family per process) and report the median over processes")
  ap.add_argument("--times-out", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  for m in models:
    if m not in MODELS:
      raise SystemExit(f"unknown model {m!r}; choose from {sorted(MODELS)}")
  families = tuple(f for f in args.family.split(",") if f)
  for f in families:
    if f not in FAMILIES:
      raise SystemExit(f"unknown family {f!r}; choose from {FAMILIES}")
  if args.processes:
    if not args.targets:
      raise SystemExit("--processes goes with --targets")
    return run_processes(args, models, families)
  data = {"device": common.device_info(), "workers": 8, "models": {}}
  for m in models:
    batch, hidden = MODELS[m]
    steps = args.steps or {"tiny": 48 if args.quick else 160, "small": 16 if args.quick else 48}[m]
    reps = args.reps or (5 if args.quick else 25 if args.targets else 9)
    print(f"== model {m}: hidden {hidden}, batch {batch} per worker, {reps} x {steps} steps",
          flush=True)
    data["models"][m] = run_model(batch, hidden, steps, reps, targets=args.targets,
                                  donate=not args.no_donate, families=families,
                                  times_out=args.times_out)
  if args.times_out:  # a child of run_processes: the raw times are its result
    return data
  suffix = "_nodonate" if args.no_donate else ""
  if args.targets:
    common.save("overhead_targets" + suffix, data)
    return data
  common.save("overhead" + suffix, data)
  plot(data)
  return data


FAMILIES = ("averaging", "easgd", "lsgd")  # the hand-written steps' kinds
HAND_FAMILY = {"model_averaging": "averaging", "model_averaging exact=False": "averaging",
               "easgd": "easgd", "lsgd": "lsgd"}


def compared_algorithms():
  """The transforms with a hand-written equivalent (their family: HAND_FAMILY):
  name -> factory(tau)."""
  sgd = optax.sgd(LR)
  return {"model_averaging": lambda tau: wagrad.model_averaging(sgd, tau),
          "model_averaging exact=False": lambda tau: wagrad.model_averaging(sgd, tau,
                                                                            exact=False),
          "easgd": lambda tau: wagrad.easgd(sgd, tau),
          "lsgd": lambda tau: wagrad.lsgd(sgd, tau)}


def run_model(batch, hidden, steps, reps, K=8, targets=False, donate=True, families=FAMILIES,
              times_out=None):
  """Time the variants of ``families`` (with local SGD; sync SGD with averaging) on one
  model; ``times_out``: also write the raw seconds per step of every repetition there."""
  runner = wagrad.Runner("shard_map", K)
  p0, x, y, loss_fn = setup(K, batch, hidden)
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(p0))
  sgd = optax.sgd(LR)
  hand = functools.partial(hand_variant, runner, p0, x, y, loss_fn, donate=donate)
  variants = {"local_sgd (no comm)": hand(0)}
  if "averaging" in families:
    variants["hand sync_sgd"] = hand(-1)
    variants["wagrad sync_sgd"] = wagrad_variant(runner, wagrad.sync_sgd(sgd), p0, x, y,
                                                 loss_fn, donate=donate)
  taus = (1, 4, 16)
  algos = {k: v for k, v in compared_algorithms().items() if HAND_FAMILY[k] in families}
  if not targets and set(families) == set(FAMILIES):
    algos.update(extra_algorithms())
  for tau in taus:
    for family in families:
      variants[f"hand {family} tau={tau}"] = hand(tau, kind=family)
      variants[f"hand {family} (as updates) tau={tau}"] = hand(tau, kind=family, as_updates=True)
    for name, factory in algos.items():
      made = factory(tau)
      tx, point = (made, None) if hasattr(made, "init") else made
      variants[f"wagrad {name} tau={tau}"] = wagrad_variant(
          runner, tx, p0, x, y, loss_fn, donate=donate, grad_point=point)

  # compile + warm up every variant (not timed)
  states = {name: common.warm_up(f, st) for name, (f, st) in variants.items()}
  times = {n: [] for n in variants}
  for r in range(reps):  # interleaved repetitions
    for name, (f, _) in variants.items():
      dt, states[name] = common.time_steps(f, states[name], steps)
      times[name].append(dt)
    print(f"rep {r + 1}/{reps} done", flush=True)
  if times_out:
    with open(times_out, "w") as f:
      json.dump({"params": int(n_params), "times": times}, f)

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
    algo, _, tau = name.partition(" tau=")
    algo = algo.removeprefix("wagrad ")
    if name.startswith("wagrad ") and algo in HAND_FAMILY:
      hand_name = f"hand {HAND_FAMILY[algo]} tau={tau}"
      upd_name = f"hand {HAND_FAMILY[algo]} (as updates) tau={tau}"
      row["hand"] = hand_name
      row["ratio_to_hand"] = med[name] / med[hand_name]
      row["paired_ratio_to_hand_q25_q50_q75"] = paired(name, hand_name)
      row["paired_ratio_to_hand_as_updates_q25_q50_q75"] = paired(name, upd_name)
      row["median_ratio_to_hand_90ci"] = median_interval(name, hand_name)
      row["median_ratio_to_hand_as_updates_90ci"] = median_interval(name, upd_name)
    if tau and (name.startswith("hand") or algo in HAND_FAMILY):
      row["paired_ratio_to_local_sgd_q25_q50_q75"] = paired(name, "local_sgd (no comm)")
      row["median_ratio_to_local_sgd_90ci"] = median_interval(name, "local_sgd (no comm)")
      row["target_ratio_to_local_sgd"] = 1 + 1 / int(tau)
    if name == "wagrad sync_sgd":
      row["hand"] = "hand sync_sgd"
      row["ratio_to_hand"] = med[name] / med["hand sync_sgd"]
      row["paired_ratio_to_hand_q25_q50_q75"] = paired(name, "hand sync_sgd")
      row["median_ratio_to_hand_90ci"] = median_interval(name, "hand sync_sgd")
    f = variants[name][0]
    if f.num_traces() is not None:
      row["num_traces"] = f.num_traces()
    row["collective_bytes"] = common.collective_bytes(f.lower(*states[name]).compile().as_text())
    rows.append(row)
    print(f"{name:44s} {row['median_ms']:7.3f} ms  x{row['ratio_to_local_sgd']:.2f} local"
          + (f"  x{row['paired_ratio_to_hand_q25_q50_q75'][1]:.3f} hand" if "hand" in row else "")
          + (f"  traces={row.get('num_traces')}" if "num_traces" in row else ""))
  return {"batch_per_worker": batch, "hidden": hidden, "params": int(n_params),
          "param_bytes": int(4 * n_params), "steps_per_rep": steps, "reps": reps,
          "donated": donate, "rows": rows}


def run_processes(args, models, families):
  """--targets --processes N: every (model, family) is timed in N fresh processes, one
  after the other. On forced CPU devices the same program's time can move by up to 70%
  with the process it runs in (EASGD, small model, tau = 1); fresh processes give each
  program several draws of that, and each family's programs share a process only with
  their own references. Per process: the median paired ratio over its repetitions; reported:
  the median over processes and the range."""
  suffix = "_nodonate" if args.no_donate else ""
  data = {"device": common.device_info(), "workers": 8, "processes": args.processes,
          "models": {}}
  for m in models:
    batch, hidden = MODELS[m]
    steps = args.steps or {"tiny": 160, "small": 48}[m]
    reps = args.reps or 15
    per_proc = []  # [process][variant] -> list of seconds per step
    for i in range(args.processes):
      times = {}
      for fam in families:
        with tempfile.TemporaryDirectory() as tmp:
          out = os.path.join(tmp, "times.json")
          cmd = [sys.executable, os.path.abspath(__file__), "--targets", "--models", m,
                 "--family", fam, "--steps", str(steps), "--reps", str(reps),
                 "--times-out", out] + (["--no-donate"] if args.no_donate else [])
          env = dict(os.environ, WAGRAD_BENCH_OUT=tmp)
          subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
          with open(out) as f:
            res = json.load(f)
        params = res["params"]
        for k, v in res["times"].items():  # local SGD: one per family process
          times[k if k != "local_sgd (no comm)" else f"local_sgd (no comm) [{fam}]"] = v
      per_proc.append(times)
      print(f"== {m}: process round {i + 1}/{args.processes} done", flush=True)
    data["models"][m] = {"batch_per_worker": batch, "hidden": hidden, "params": params,
                         "steps_per_rep": steps, "reps": reps, "donated": not args.no_donate,
                         "rows": process_rows(per_proc)}
  common.save("overhead_targets" + suffix, data)
  return data


def process_rows(per_proc):
  """Rows of run_processes: for each variant and reference, every process's median
  paired ratio, their median and range."""
  def ratio(a, b):
    rs = [float(np.median(np.asarray(p[a]) / np.asarray(p[b]))) for p in per_proc]
    return {"median": float(np.median(rs)), "min": min(rs), "max": max(rs), "per_process": rs}
  rows = []
  for name in per_proc[0]:
    if name.startswith("local_sgd"):
      continue
    algo, _, tau = name.partition(" tau=")
    algo = algo.removeprefix("wagrad ")
    fam = HAND_FAMILY.get(algo) or ("averaging" if "sync_sgd" in name else
                                    algo.removeprefix("hand ").removesuffix(" (as updates)"))
    row = {"variant": name,
           "median_ms": 1e3 * float(np.median([np.median(p[name]) for p in per_proc]))}
    if tau:
      row["x_local_sgd"] = ratio(name, f"local_sgd (no comm) [{fam}]")
      row["target_ratio_to_local_sgd"] = 1 + 1 / int(tau)
    if name.startswith("wagrad ") and algo in HAND_FAMILY:
      row["x_hand"] = ratio(name, f"hand {fam} tau={tau}")
      row["x_hand_as_updates"] = ratio(name, f"hand {fam} (as updates) tau={tau}")
    if name == "wagrad sync_sgd":
      row["x_hand"] = ratio(name, "hand sync_sgd")
    rows.append(row)
  return rows


def extra_algorithms():
  """Algorithms without a hand-written equivalent here: name -> factory(tau) returning a
  transform or (transform, grad_point). Not timed here: the variants that need per-step
  inputs (async EASGD / LSGD and WP-SGD with activity tables, staleness-aware SGD with
  its push schedule, WASGD+ with a shared evaluation batch) or a two-level mesh (tree
  EASGD, multi-leader LSGD); the CPU example and the tests run them."""
  sgd = optax.sgd(LR)
  return {"wasgd": lambda tau: wagrad.wasgd(sgd, tau),
          "wpsgd": lambda tau: wagrad.wpsgd(sgd, tau, weighting="samples"),
          "eamsgd": lambda tau: (wagrad.eamsgd(LR, tau, momentum=0.9), wagrad.eamsgd_lookahead),
          "downpour": lambda tau: wagrad.downpour(LR / 8, tau),
          "diloco": lambda tau: wagrad.diloco(inner=sgd, sync_period=tau)}


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
    colors = ["tab:blue" if r["variant"].startswith("wagrad") else
              "tab:gray" if r["variant"].startswith("hand") else "tab:green" for r in rows]
    ax.barh([r["variant"] for r in rows], [r["median_ms"] for r in rows], color=colors,
            xerr=[[r["median_ms"] - r["min_ms"] for r in rows],
                  [r["max_ms"] - r["median_ms"] for r in rows]])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median, min-max)")
    ax.set_title(f"{name}: {m['params']} params, batch {m['batch_per_worker']}/worker")
  fig.suptitle(f"8 workers, {data['device']['platform']} x{data['device']['device_count']}"
               " (blue: wagrad, gray: hand-written raw lax, green: no communication)")
  fig.tight_layout()
  path = os.path.join(common.OUT, "overhead.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
