"""The training loop behind examples/cpu_digits.py (also used by tests and benchmarks).

Read it top to bottom: data -> model -> per-worker step -> runner -> loop -> evaluation.
"""

from __future__ import annotations

import time

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


def _average(params, axis_name):
  return wagrad.one_shot_average(params, axis_name).value


# name -> (factory(lr, tau, axis_name) -> (tx, evaluated-model rule), description)
def _baselines():
  return {
      "sync_sgd": (lambda lr, tau, ax: (wagrad.sync_sgd(optax.sgd(lr), axis_name=ax), "average"),
                   "synchronous all-reduce SGD"),
      "model_averaging": (lambda lr, tau, ax: (wagrad.model_averaging(
          optax.sgd(lr), tau, axis_name=ax), "average"), "periodic model averaging (local SGD)"),
      "one_shot": (lambda lr, tau, ax: (wagrad.model_averaging(
          optax.sgd(lr), None, axis_name=ax), "average"), "one-shot averaging (SimuParallel)"),
      "diloco": (lambda lr, tau, ax: (wagrad.diloco(
          inner=optax.sgd(lr), outer_learning_rate=0.7, sync_period=tau, axis_name=ax), "average"),
                 "DiLoCo (outer Nesterov on the pseudo-gradient)"),
  }


ALGORITHMS = dict(_baselines())


def train_digits(names, *, workers=8, steps=300, batch=16, lr=0.1, sync_period=8,
                 eval_every=25, backend="vmap", seed=0, progress=True):
  """Train each algorithm in ``names``; return a list of result dicts."""
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
    tx, evaluated = ALGORITHMS[name][0](lr, sync_period, runner.axis_name)

    def step(p, s, x, y, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p, value=loss)
      return wagrad.apply_updates(p, u, s), s, loss

    def evaluate(p, evaluated=evaluated):
      pe = _average(p, runner.axis_name)
      logits = model.apply({"params": pe}, Xte)
      return jnp.mean(jnp.argmax(logits, -1) == yte)

    step_fn = runner.map(step)
    eval_fn = runner.map(evaluate)
    params, state = runner.replicate(p0), runner.init(tx, p0)
    rng = np.random.default_rng(seed + 1)
    curve_steps, curve_acc = [], []
    it = range(steps)
    if progress:
      from tqdm.auto import tqdm
      it = tqdm(it, desc=f"{name:18s}", leave=False, mininterval=0.5)
    t0 = time.perf_counter()
    for t in it:
      idx = rng.integers(0, n_local, size=(workers, batch))
      xb = np.take_along_axis(Xs, idx[:, :, None], axis=1)
      yb = np.take_along_axis(ys, idx, axis=1)
      params, state, loss = step_fn(params, state, xb, yb)
      if (t + 1) % eval_every == 0 or t + 1 == steps:
        acc = float(np.asarray(eval_fn(params))[0])
        curve_steps.append(t + 1)
        curve_acc.append(acc)
        if progress:
          it.set_postfix(loss=f"{float(np.mean(loss)):.3f}", acc=f"{acc:.3f}")
    jax.block_until_ready(params)
    results.append({"algorithm": name, "evaluated": evaluated, "test_acc": curve_acc[-1],
                    "seconds": time.perf_counter() - t0, "curve_steps": curve_steps,
                    "curve_acc": curve_acc})
  return results
