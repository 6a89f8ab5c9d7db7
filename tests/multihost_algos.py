"""The computation both the multi-process and the single-process runs do."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

import wagrad


def factories():
  out = {"model_averaging": lambda ax: wagrad.model_averaging(optax.sgd(0.1), 3, axis_name=ax)}
  if hasattr(wagrad, "easgd"):
    out["easgd"] = lambda ax: wagrad.easgd(optax.sgd(0.1), 2, axis_name=ax)
  if hasattr(wagrad, "lsgd"):
    out["lsgd"] = lambda ax: wagrad.lsgd(optax.sgd(0.1), 2, axis_name=ax)
  if hasattr(wagrad, "wasgd"):
    out["wasgd"] = lambda ax: wagrad.wasgd(optax.sgd(0.1), 2, axis_name=ax)
  return out


def run_algorithms(names, steps=7):
  K = 8
  rng = np.random.default_rng(0)
  A = rng.normal(size=(K, 6, 3)).astype(np.float32)
  b = rng.normal(size=(K, 6)).astype(np.float32)
  runner = wagrad.Runner("shard_map", K)
  res = {}
  for name in names:
    tx = factories()[name](runner.axis_name)

    def step(p, s, A, b):
      loss, g = jax.value_and_grad(lambda p: jnp.mean((A @ p["w"] - b) ** 2))(p)
      u, s = tx.update(g, s, p, value=loss)
      return wagrad.apply_updates(p, u, s), s

    f = runner.map(step)
    p0 = {"w": jnp.zeros(3)}
    p, s = runner.replicate(p0), runner.init(tx, p0)
    for _ in range(steps):
      p, s = f(p, s, A, b)
    res[name] = np.asarray(multihost_utils.process_allgather(p["w"], tiled=True))
    # every process calls it; the workers' rows are gathered across processes
    res[name + "_evaluated"] = np.asarray(wagrad.evaluated_params(p, s)["w"])
  return res
