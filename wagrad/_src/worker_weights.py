"""Aggregation weights over the workers (WASGD, WP-SGD): WASGD's weight functions of
the workers' losses, and the length-K weight vectors of the shared state.

Weight functions [reconstruction from the WASGD paper's abstract, arXiv 2004.03749;
the reasoning is in :mod:`wagrad._src.weighted`], of this worker's loss ``L_i`` among
the workers' (:func:`loss_weights`)::

    "boltzmann":  w_i ∝ exp(-L_i / T)   (T -> inf: plain averaging; T = 0: the best worker)
    "rank":       w_i ∝ K_f - r_i       (r_i: finite workers with a strictly lower loss,
                                         K_f: finite workers; the best gets K_f)
    "uniform":    w_i ∝ 1

A worker whose loss is non-finite gets weight 0.

WASGD's and WP-SGD's shared state keeps length-K vectors (weights, losses, step
counts). ``init`` knows K only when ``num_workers`` is given or the worker axis is
bound (``runner.init``); otherwise they start with length 0 and take their length on
the first step (:func:`uniform_weights`, :func:`worker_vector`, :func:`sized_vectors`).

References:
  "Weighted Aggregating Stochastic Gradient Descent for Parallel Deep Learning",
  IEEE TKDE 34(10), 2022, arXiv 2004.03749 (reconstruction from the abstract).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src.base import AxisName

WEIGHT_FNS = ("boltzmann", "rank", "uniform")


def axis_workers(axis_name):
  """K as a Python int (``psum`` of a Python constant is static)."""
  return int(lax.psum(1, axis_name))


def sized_vectors(sh, **vectors):
  """The length-K vectors whose stored value is still the length-0 placeholder of
  ``init`` (see :func:`worker_vector`): they take their length in this step's new state."""
  return {k: v for k, v in vectors.items() if getattr(sh, k).shape != v.shape}


def uniform_weights(num_workers, axis_name):
  """``(K, uniform length-K weights)`` for ``init``; K = 0 (a placeholder filled on the
  first step, see :func:`worker_vector`) when it cannot be known yet."""
  n = base.infer_num_workers(num_workers, axis_name) or 0
  return n, jnp.full((n,), 1.0 / max(n, 1), jnp.float32)


def worker_vector(v, K, fill, dtype):
  """A length-K shared vector: ``v`` itself, or a constant when ``v`` is a placeholder.

  ``init`` runs outside the mapped function and cannot know K unless ``num_workers``
  was given; then the vectors start with length 0 and are filled on the first step.
  """
  if v.shape == (K,):
    return v
  if v.shape != (0,):
    raise ValueError(
        f"the state holds a weights vector of length {v.shape[0]} but {K} workers run "
        f"this step: pass `num_workers={K}` (or re-initialise the state).")
  return jnp.full((K,), fill, dtype)


def check_temperature(temperature):
  base.check_range("temperature", temperature, 0.0, math.inf)


def loss_weights(loss: ArrayLike, axis_name: AxisName, weight_fn: str = "boltzmann",
                 temperature: float = 1.0) -> jax.Array:
  """This worker's (unnormalised) aggregation weight from the workers' losses.

  Reconstruction from the WASGD paper's abstract (arXiv 2004.03749); see the module
  docstring. A non-finite loss gets weight 0.

  Args:
    loss: this worker's scalar loss.
    axis_name: the worker axis.
    weight_fn: ``"boltzmann"`` (``exp(-L_i / T)``, normalised), ``"rank"``
      (``K_f - r_i``, r_i = number of finite workers with a strictly lower loss),
      ``"uniform"`` (1).
    temperature: T >= 0 of the Boltzmann weights (``inf`` allowed).

  Returns:
    A float32 scalar >= 0 (normalise with :func:`wagrad.collectives.weighted_mean` or
    :func:`wagrad.normalize_weights`).

  Example:
    >>> # inside a mapped function:
    >>> # w = loss_weights(loss, "workers", "rank")
    >>> # x_w = wagrad.collectives.weighted_mean(params, w, "workers").value

  References:
    arXiv 2004.03749 (reconstruction from the abstract).
  """
  if weight_fn not in WEIGHT_FNS:
    raise ValueError(f"unknown `weight_fn` {weight_fn!r}; choose one of {WEIGHT_FNS}.")
  loss = jnp.asarray(loss, jnp.float32)
  finite = jnp.isfinite(loss)
  if weight_fn == "boltzmann":
    w, _ = C.softmax_weights(loss, axis_name, temperature)
    return w
  if weight_fn == "uniform":
    return jnp.where(finite, 1.0, 0.0).astype(jnp.float32)
  losses = C.all_gather(loss, axis_name)
  fin = jnp.isfinite(losses)
  k_f = jnp.sum(fin.astype(jnp.int32))
  better = jnp.sum((fin & (jnp.where(fin, losses, jnp.inf) < loss)).astype(jnp.int32))
  return jnp.where(finite, (k_f - better).astype(jnp.float32), 0.0)
