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

import jax
import jax.numpy as jnp
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C


def sync_model_state(model_state, opt_state, axis_name="workers"):
  """Apply the exchange rule of the wagrad transform in ``opt_state`` to ``model_state``.

  Reads the transform's shared state: ``exchanged`` (or ``assign``) says whether this
  step exchanged; ``mix_weights`` (a length-K vector, optional) gives the weights of the
  workers' model states, uniform (a mean over finite workers) when absent. The
  collective runs only on exchange steps (``lax.cond`` on a shared predicate).
  """
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
    return C.weighted_mean(s, w, axis_name).value

  return lax.cond(pred, mix, lambda s: s, model_state)
