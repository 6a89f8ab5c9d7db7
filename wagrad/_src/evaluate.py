"""The model each transform's paper evaluates, read from a run's state.

One accessor for every transform, called outside the mapped step on what
:class:`wagrad.Runner` holds: the workers' parameters stacked along a leading worker
dimension and the optimizer state (shared parts unstacked). It asks the rule: every
shared-state class has a method ``evaluated(params, opt_state)`` that returns its
paper's model, built from the helpers here (:func:`weighted_rows`, :func:`leader_model`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wagrad._src import base
from wagrad._src.base import PyTree


def weighted_rows(params, weights):
  """``sum_k w_k x_k / sum_k w_k`` over the leading worker axis, finite workers only
  (plain mean when no weight is left)."""
  finite = np.ones(jax.tree_util.tree_leaves(params)[0].shape[0], bool)
  for x in jax.tree_util.tree_leaves(params):
    finite &= np.isfinite(np.asarray(x, np.float64)).reshape(x.shape[0], -1).all(1)
  w = np.where(finite, np.asarray(weights, np.float64), 0.0)
  if w.sum() <= 0:
    w = finite.astype(np.float64)
  w = w / max(w.sum(), 1e-300)

  def combine(x):  # a non-finite worker's rows are zeroed: 0 * NaN would be NaN
    x64 = np.asarray(x, np.float64)
    x64 = np.where(finite.reshape((-1,) + (1,) * (x64.ndim - 1)), x64, 0.0)
    return jnp.asarray(np.tensordot(w, x64, 1), x.dtype)
  return jax.tree_util.tree_map(combine, params)


def _on_host(tree):
  """Leaves spread over several processes (a multi-host run) brought whole to this
  process: every process must call this (``process_allgather`` is a collective)."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree_util.tree_map(get, tree)


_NNX_HINT = ("With Flax NNX: `models, opt = nnx.merge(graphdef, state)`, then "
             "`wagrad.evaluated_params(nnx.state(models, nnx.Param), opt.opt_state)`.")


def _num_workers(params) -> int:
  """K, the leading dimension every leaf of the stacked ``params`` shares; a TypeError
  naming what to pass otherwise."""
  leaves = jax.tree_util.tree_leaves(params)
  stacked = bool(leaves) and all(hasattr(x, "shape") and np.ndim(x) >= 1 for x in leaves)
  dims = sorted({int(np.shape(x)[0]) for x in leaves}) if stacked else []
  if len(dims) != 1:
    got = (f"leaves with leading dimensions {dims}" if stacked
           else f"{type(params).__name__} {params!r}"[:120])
    raise TypeError("`params` must be the workers' parameters stacked along a leading "
                    "worker dimension (as `runner.replicate` and the mapped step return "
                    f"them), got {got}. {_NNX_HINT}")
  return dims[0]


def evaluated_params(params: PyTree, opt_state: PyTree) -> PyTree:
  """The model the transform's paper evaluates, outside the mapped step.

  ``params``: the workers' parameters, stacked (leading dimension K, as
  ``runner.replicate`` / the mapped step return them); ``opt_state``: the transform's
  state as the runner holds it (also nested in an ``optax.chain``). With Flax NNX pass
  ``nnx.state(model, nnx.Param)`` and ``optimizer.opt_state`` of the stacked model and
  optimizer (``nnx.merge(graphdef, state)`` outside the mapped step). In a multi-host
  run every process calls it and gets the whole model (the workers' rows are gathered
  across processes). Returns one unstacked parameter tree of plain arrays:

  * model averaging, one-shot averaging, synchronous SGD: the mean of the finite
    workers (after an exchange every worker holds it); with DiLoCo's outer optimizer
    ``x_global``, the outer model;
  * EASGD, EAMSGD, asynchronous EASGD, DOWNPOUR: the center (the root for tree EASGD);
  * LSGD, asynchronous LSGD, multi-leader LSGD: the current parameters of the last
    (global) leader (the copy kept at its election if they went non-finite since); the
    mean before any election;
  * WASGD / WASGD+: ``sum_k w_k x_k`` with the last exchange's weights;
  * WP-SGD: ``sum_k s(t_k) x_k / sum_k s(t_k)`` over the local steps since the last
    combination (as :func:`wagrad.wpsgd_combine`);
  * staleness-aware SGD: the server's parameters.

  Example:
    >>> # after training with runner.map(step): params, opt_state = ...
    >>> # model = wagrad.evaluated_params(params, opt_state)
  """
  params, opt_state = _on_host(base.pure(params)), _on_host(base.pure(opt_state))
  _num_workers(params)
  sh = base.find_shared(opt_state, "count")
  if sh is not None and np.ndim(sh.count) == 1:  # a Flax NNX state stacks shared leaves too
    sh = jax.tree_util.tree_map(lambda x: x[0], sh)
  if sh is None:
    raise TypeError("`opt_state` holds no wagrad transform state: pass the transform's "
                    f"state as the runner holds it (the mapped step's `opt_state`). {_NNX_HINT}")
  return sh.evaluated(params, opt_state)


def row_weights(params, weights) -> np.ndarray:
  """A rule's length-K weights, or uniform while the state holds the length-0
  placeholder (no exchange yet, K unknown at ``init``)."""
  K, w = _num_workers(params), np.asarray(weights)
  return w if w.shape == (K,) else np.ones(K)


def mean_rows(params) -> PyTree:
  """The mean of the finite workers' rows of the stacked ``params``."""
  return weighted_rows(params, np.ones(_num_workers(params)))


def leader_model(params, leader, *copies) -> PyTree:
  """The leader's row; the first copy kept at its election when that row went
  non-finite since; the mean before any election."""
  leader = int(np.asarray(leader))
  if leader < 0:
    return mean_rows(params)
  x = jax.tree_util.tree_map(lambda v: v[leader], params)
  if all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(x)):
    return x
  for copy in copies:
    if copy is not None:
      return copy
  return mean_rows(params)
