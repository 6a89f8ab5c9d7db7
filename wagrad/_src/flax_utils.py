"""Flax integration: model-state (BatchNorm statistics) sync driven by the transform state.

Parameters are exchanged by the wagrad transform; a Flax model's non-trainable state
(``batch_stats`` in linen, ``nnx.BatchStat`` in nnx) is not seen by the optimizer. Call
:func:`sync_model_state` in the training step after ``tx.update`` with the new optimizer
state: on the steps where the transform exchanged parameters it applies the same rule
to the model state (plain mean for averaging, the algorithm's mixing weights -- e.g.
the aggregation weights of WASGD or a one-hot leader for LSGD -- where the transform
exposes ``mix_weights``), and leaves it untouched on every other step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src.base import AxisName, PyTree

if TYPE_CHECKING:
  from flax import nnx


def sync_model_state(model_state: PyTree, opt_state: PyTree, axis_name: AxisName = "workers",
                     rate: float = 1.0) -> PyTree:
  """Apply the exchange rule of the wagrad transform in ``opt_state`` to ``model_state``.

  Reads the transform's shared state: ``exchanged`` (or ``assign``) says whether this
  step exchanged; ``mix_weights`` (a length-K vector, optional) gives the weights of the
  workers' model states, uniform (a mean over finite workers) when absent. On exchange
  steps ``s <- (1 - rate) s + rate * sum_j w_j s_j``: ``rate=1`` assigns the mix
  (averaging, WASGD with moving rate 1); pass LSGD's ``pull`` (its ``mix_weights`` is the
  one-hot of the leader) or WASGD's ``moving_rate`` to pull the statistics as the
  parameters are pulled. The collective runs only on exchange steps (``lax.cond`` on a
  shared predicate).

  Which steps it follows: model averaging, DiLoCo, LSGD, WASGD, WASGD+ and WP-SGD
  exchanges, multi-leader LSGD's global rounds, DOWNPOUR's exchanges, and the end of a
  warm-up. It leaves the model state local (returns it unchanged) on EASGD's and
  EAMSGD's elastic exchanges, on tree EASGD, and on every transform whose exchanges are
  per worker (``async_easgd``, ``async_lsgd``, ``staleness_aware_sgd``): there is no
  shared exchange step to follow. For those, re-estimate the evaluated model's
  statistics on training batches (:func:`reestimate_batch_stats`).
  """
  base.check_range("rate", rate, 0.0, 1.0, lo_open=True)
  base.check_axis_name(axis_name)
  sh = base.find_shared(opt_state, "count")
  if sh is None:
    raise TypeError("`opt_state` holds no wagrad transform state.")
  pred = getattr(sh, "exchanged", None)
  if pred is None:
    pred = getattr(sh, "assign", jnp.bool_(False))
  weights = getattr(sh, "mix_weights", None)

  def mix(s):
    w = 1.0 if weights is None else weights[lax.axis_index(axis_name)]
    m = C.weighted_mean(s, w, axis_name).value
    if rate == 1.0:
      return m
    return jax.tree_util.tree_map(
        lambda a, b: ((1.0 - rate) * a.astype(jnp.float32) + rate * b.astype(jnp.float32)
                      ).astype(a.dtype), s, m)

  return lax.cond(pred, mix, lambda s: s, model_state)


def nnx_update(optimizer: nnx.Optimizer, model: nnx.Module, grads: PyTree, **kwargs: Any
               ) -> None:
  """``optimizer.update(model, grads, **kwargs)`` for a ``flax.nnx.Optimizer`` whose
  transform is a wagrad transform, then take the rule's values exactly where it assigns:
  the target on assigning steps, the center / leader / server for a worker reset this
  step (nnx's own update applies ``params + updates``; see ``wagrad.apply_updates``).
  """
  from flax import nnx

  optimizer.update(model, grads, **kwargs)
  opt_state = base.pure(optimizer.opt_state)
  if base.find_shared(opt_state, "assign") is None:
    return
  params = nnx.state(model, optimizer.wrt)
  nnx.replace_by_pure_dict(params, base.take_assigned(nnx.to_pure_dict(params), opt_state))
  nnx.update(model, params)


def reestimate_batch_stats(apply_fn: Callable[[Mapping[str, PyTree], Any], tuple[Any, Any]],
                           variables: Mapping[str, PyTree], batches: Iterable[Any], *,
                           collection: str = "batch_stats") -> PyTree:
  """Re-estimate BatchNorm statistics of ``variables`` on training batches (the LSGD
  authors' evaluation rule for the averaged model): the mean over ``batches`` of each
  batch's own statistics ("precise BN").

  ``apply_fn(variables, batch)`` runs the model in training mode and returns
  ``(out, updated)`` with ``updated[collection]`` the new statistics, e.g.
  ``lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])``. A linen
  BatchNorm blends ``new = m * old + (1 - m) * batch``; running each batch from zero
  and from one statistics gives ``1 - m`` and hence the batch statistic exactly,
  whatever the layer's momentum m.
  """
  stats = variables[collection]
  zeros = jax.tree_util.tree_map(jnp.zeros_like, stats)
  ones = jax.tree_util.tree_map(jnp.ones_like, stats)
  total, n = zeros, 0
  for batch in batches:
    s0 = apply_fn({**variables, collection: zeros}, batch)[1][collection]
    s1 = apply_fn({**variables, collection: ones}, batch)[1][collection]
    b = jax.tree_util.tree_map(lambda a, c: a / (1.0 - (c - a)), s0, s1)
    total = jax.tree_util.tree_map(jnp.add, total, b)
    n += 1
  if n == 0:
    raise ValueError("`batches` is empty: need at least one training batch.")
  return jax.tree_util.tree_map(lambda t: t / n, total)
