"""The training loop behind examples/cpu_digits.py (also used by tests and benchmarks).

Read it top to bottom: data -> model -> per-worker step -> runner -> loop -> evaluation.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

import wagrad


class MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def load_digits(seed=0):
  from sklearn.datasets import load_digits as _load
  X, y = _load(return_X_y=True)
  X = (X / 16.0).astype(np.float32)
  idx = np.random.default_rng(seed).permutation(len(X))
  X, y = X[idx], y[idx].astype(np.int32)
  return (X[:1400], y[:1400]), (X[1400:], y[1400:])


class Algo(NamedTuple):
  """How the example runs one algorithm (everything but the transform is optional)."""
  tx: object
  evaluated: str                      # which model the paper evaluates
  grad_point: Callable | None = None  # (params, state) -> where the gradient is taken
  apply: Callable | None = None       # (params, updates, state) -> new params
  rows: Callable | None = None        # t -> dict of per-step extra args for tx.update
  eval_loss: bool = False             # pass eval_value= (loss on a batch shared by all)


def _softsync(lr, K, steps, seed, modulation, n=None):
  """n-softsync over K learners (default n = K: fully asynchronous, c = 1), random arrivals."""
  sched = wagrad.schedules.softsync_schedule(K, n or K, steps, arrival="random", seed=seed)
  tx = wagrad.staleness_aware_sgd(optax.sgd(1.0), alpha0=lr, modulation=modulation)

  def rows(t):
    push, stale, apply = sched.row(t)
    return {"push": push, "staleness": stale, "apply": apply}
  return tx, rows


def _make_registry():
  """name -> (factory(lr, tau, axis_name, K, steps, seed) -> Algo, description)."""
  sgd = optax.sgd
  reg = {
      "sync_sgd": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.sync_sgd(sgd(lr), axis_name=ax), "average"),
          "synchronous all-reduce SGD"),
      "model_averaging": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.model_averaging(sgd(lr), tau, axis_name=ax), "average"),
          "periodic model averaging (local SGD)"),
      "one_shot": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.model_averaging(sgd(lr), None, axis_name=ax), "average"),
          "one-shot averaging (SimuParallel SGD)"),
      "diloco": (lambda lr, tau, ax, K, T, seed, opts: Algo(wagrad.diloco(
          inner=sgd(lr), outer_learning_rate=0.7, sync_period=tau, axis_name=ax), "global"),
          "DiLoCo: outer Nesterov SGD on the pseudo-gradient"),
      "easgd": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.easgd(sgd(lr), tau, axis_name=ax), "center"),
          "elastic averaging SGD (beta = 0.9)"),
      "eamsgd": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.eamsgd(optax.sgd(lr / 5), tau, momentum=0.9, axis_name=ax), "center",
          grad_point=wagrad.eamsgd_lookahead), "elastic averaging momentum SGD"),
      "downpour": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.downpour(lr / K, tau, axis_name=ax), "master"),
          "DOWNPOUR (accumulated updates pushed to the master)"),
      "lsgd": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          wagrad.lsgd(sgd(lr), tau, axis_name=ax, num_workers=K), "leader"),
          "leader SGD (pull toward the best worker)"),
      "staleness_aware": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          *(lambda tx_rows: (tx_rows[0], "server", None, wagrad.apply_updates,
                             tx_rows[1]))(_softsync(lr * 2, K, T, seed, "inverse", opts.get("softsync_n")))),
          "staleness-aware async SGD, fully asynchronous (n = K)"),
      "asgd": (lambda lr, tau, ax, K, T, seed, opts: Algo(
          *(lambda tx_rows: (tx_rows[0], "server", None, wagrad.apply_updates,
                             tx_rows[1]))(_softsync(lr * 2, K, T, seed, "none", opts.get("softsync_n")))),
          "plain asynchronous SGD, same schedule (baseline)"),
  }
  reg["wasgd"] = (lambda lr, tau, ax, K, T, seed, opts: Algo(
      wagrad.wasgd(sgd(lr), tau, temperature=0.1, axis_name=ax, num_workers=K),
      "weighted average"), "weighted aggregating SGD, Boltzmann weights (reconstruction)")
  reg["wasgd_plus"] = (lambda lr, tau, ax, K, T, seed, opts: Algo(
      wagrad.wasgd_plus(sgd(lr), tau, temperature=0.1, axis_name=ax, num_workers=K),
      "weighted average", eval_loss=True),
      "WASGD+: weights from a loss on a batch shared by all workers (reconstruction)")
  reg["wpsgd"] = (lambda lr, tau, ax, K, T, seed, opts: Algo(
      wagrad.wpsgd(sgd(lr), tau, weighting="samples", axis_name=ax, num_workers=K),
      "weighted average", rows=_straggler_rows(K, T, seed, opts.get("speeds"))),
      "WP-SGD, half the workers 4x slower (reconstruction)")
  reg["averaging_unbalanced"] = (lambda lr, tau, ax, K, T, seed, opts: Algo(
      wagrad.wpsgd(sgd(lr), tau, weighting="uniform", axis_name=ax, num_workers=K),
      "average", rows=_straggler_rows(K, T, seed, opts.get("speeds"))),
      "plain averaging, same unbalanced load as wpsgd (baseline)")
  return reg


def _straggler_rows(K, T, seed, speeds=None):
  """Activity masks: the given per-worker speeds, default half the workers 4x slower."""
  speeds = wagrad.schedules.straggler_speeds(K, 0.5, 4.0) if speeds is None else speeds
  active = wagrad.schedules.speed_schedule(K, T, speeds, seed=seed)
  return lambda t: {"active": active[t]}


ALGORITHMS = _make_registry()


def _authors_inner(lr):
  """The LSGD authors' local optimizer: SGD, Nesterov momentum 0.9, weight decay 1e-4."""
  return optax.chain(optax.add_decayed_weights(1e-4),
                     optax.sgd(lr, momentum=0.9, nesterov=True))


def _multi_leader(inner):
  """Multi-leader LSGD over 2 groups: local leader every tau / 4 steps (the authors'
  l_comm = g_comm / 4), global leader every tau; pulls and proximal terms 0.1."""
  return lambda lr, tau, ax, K, T, seed, opts: Algo(wagrad.multi_leader_lsgd(
      inner(lr), group_axis=opts["axes"][0], global_axis=opts["axes"][1],
      local_period=max(tau // 4, 1), global_period=tau, num_workers=K), "leader")


# The papers' comparisons with the hyperparameters the authors' code gives
# (benchmarks/convergence.py); not part of the CPU example's default run.
PAPER_SETTINGS = {
    "easgd_authors": (lambda lr, tau, ax, K, T, seed, opts: Algo(
        wagrad.easgd(optax.sgd(0.1), tau, axis_name=ax), "center"),
        "EASGD as in the authors' launch script: eta 0.1"),
    "eamsgd_authors": (lambda lr, tau, ax, K, T, seed, opts: Algo(
        wagrad.eamsgd(optax.sgd(0.01), tau, momentum=0.99, axis_name=ax), "center",
        grad_point=wagrad.eamsgd_lookahead),
        "EAMSGD as in the authors' launch script: eta 0.01, delta 0.99"),
    "lsgd_authors": (lambda lr, tau, ax, K, T, seed, opts: Algo(
        wagrad.lsgd(_authors_inner(lr), tau, pull=0.1, proximal=0.1, axis_name=ax,
                    num_workers=K), "leader"),
        "LSGD, the authors' defaults: c = p = 0.1, Nesterov 0.9, weight decay 1e-4"),
    "easgd_lsgd_inner": (lambda lr, tau, ax, K, T, seed, opts: Algo(
        wagrad.easgd(_authors_inner(lr), tau, axis_name=ax), "center"),
        "EASGD with the LSGD authors' local optimizer (their baseline)"),
    "multi_leader_lsgd_authors": (_multi_leader(_authors_inner),
                                  "multi-leader LSGD, 2 groups, the authors' defaults"),
    "downpour_async": (lambda lr, tau, ax, K, T, seed, opts: Algo(
        wagrad.downpour(lr / K, tau, axis_name=ax, asynchronous=True), "master",
        rows=_straggler_rows(K, T, seed, opts.get("speeds"))),
        "DOWNPOUR on each worker's own clock, half the workers 4x slower"),
}
GROUPS = {"multi_leader_lsgd_authors": 2}  # algorithms run on a runner with groups


SAMPLING = ("shards", "whole")


def train_digits(names, *, workers=8, steps=300, batch=16, lr=0.1, sync_period=8,
                 eval_every=25, backend="vmap", seed=0, progress=True, speeds=None,
                 softsync_n=None, sampling="shards"):
  """Train each algorithm in ``names``; return a list of result dicts.

  ``speeds`` (K values in (0, 1]) drives the unbalanced-load algorithms (wpsgd,
  averaging_unbalanced); ``softsync_n`` the n of n-softsync (staleness_aware, asgd).
  ``sampling``: ``"shards"`` (each worker draws from its own disjoint shard of the
  training set) or ``"whole"`` (each worker draws from the whole training set, its own
  random stream: the setting of the EASGD, LSGD and staleness-aware papers' parameter
  servers, and the LSGD authors' ``--random_sampler``).
  """
  if sampling not in SAMPLING:
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLING)}")
  opts = {"speeds": speeds, "softsync_n": softsync_n}
  (Xtr, ytr), (Xte, yte) = load_digits(seed)
  runner = wagrad.Runner(backend, workers)
  Xs, ys = runner.shard(Xtr, ytr)  # [K, n/K, ...]: each worker its own shard
  n_local = Xs.shape[1]
  model = MLP()
  p0 = model.init(jax.random.key(seed), Xtr[:1])["params"]

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  results = []
  for name in names:
    run = runner if name not in GROUPS else wagrad.Runner(backend, workers, groups=GROUPS[name])
    opts["axes"] = (run.group_axis, run.global_axis)
    factory = (ALGORITHMS.get(name) or PAPER_SETTINGS[name])[0]
    algo = factory(lr, sync_period, run.axis_name, workers, steps, seed, opts)
    tx = algo.tx

    def step(p, s, x, y, extra, algo=algo):
      at = p if algo.grad_point is None else algo.grad_point(p, s)
      loss, g = jax.value_and_grad(loss_fn)(at, x, y)
      if algo.eval_loss:  # WASGD+: a loss every worker measures on the same batch
        xe, ye = extra.pop("eval_batch").value
        extra["eval_value"] = loss_fn(p, xe, ye)
      u, s = algo.tx.update(g, s, p, value=loss, **extra)
      new_p = (algo.apply or wagrad.apply_updates)(p, u, s)
      return new_p, s, loss

    def evaluate(params, state):  # outside the mapped step: the model the paper evaluates
      logits = model.apply({"params": wagrad.evaluated_params(params, state)}, Xte)
      return float(jnp.mean(jnp.argmax(logits, -1) == yte))

    step_fn = run.map(step)
    params, state = run.replicate(p0), run.init(tx, p0)
    rng = np.random.default_rng(seed + 1)
    curve_steps, curve_acc = [], []
    it = range(steps)
    if progress:
      from tqdm.auto import tqdm
      it = tqdm(it, desc=f"{name:18s}", leave=False, mininterval=0.5)
    t0 = time.perf_counter()
    for t in it:
      if sampling == "whole":  # every worker its own draws from all of the training set
        idx = rng.integers(0, len(Xtr), size=(workers, batch))
        xb, yb = Xtr[idx], ytr[idx]
      else:
        idx = rng.integers(0, n_local, size=(workers, batch))
        xb = np.take_along_axis(Xs, idx[:, :, None], axis=1)
        yb = np.take_along_axis(ys, idx, axis=1)
      extra = algo.rows(t) if algo.rows else {}
      if algo.eval_loss:
        j = rng.integers(0, len(Xtr), size=64)
        extra["eval_batch"] = wagrad.Shared((Xtr[j], ytr[j]))
      params, state, loss = step_fn(params, state, xb, yb, extra)
      if (t + 1) % eval_every == 0 or t + 1 == steps:
        acc = evaluate(params, state)
        curve_steps.append(t + 1)
        curve_acc.append(acc)
        if progress:
          it.set_postfix(loss=f"{float(np.mean(loss)):.3f}", acc=f"{acc:.3f}")
    jax.block_until_ready(params)
    results.append({"algorithm": name, "evaluated": algo.evaluated, "test_acc": curve_acc[-1],
                    "seconds": time.perf_counter() - t0, "curve_steps": curve_steps,
                    "curve_acc": curve_acc})
  return results
