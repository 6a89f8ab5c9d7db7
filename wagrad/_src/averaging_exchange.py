"""Model averaging's exchange, piece by piece: DiLoCo's outer step, the compressed mean,
torchft's ``update_alpha`` and Streaming DiLoCo's fragments (:func:`wagrad.model_averaging`).

At an exchange the workers' parameters are averaged, in float32 or as quantized
pseudo-gradients ``d_i = x_i - x_global`` with error feedback
(:mod:`wagrad._src.compression`), and the outer optimizer takes the pseudo-gradient
(DiLoCo)::

    xbar = mean over finite, active workers of x_i
    x_global <- x_global + outer(x_global - xbar)
    x_i <- x_global,  or  x_i <- (1 - alpha) x_global + alpha x_i   (update_alpha)

With F > 1 fragments (Streaming DiLoCo) the leaves, in tree order, are cut into F
contiguous groups of about equal size, and fragment f is exchanged alone after step
``s = floor(H (f + 1) / F) (mod H)`` of each period H (torchft's offsets).

Here: the fragments (:func:`fragments`, :func:`parts`, :func:`fragment_due`), the
validation of ``model_averaging``'s arguments (:func:`check_averaging`) and
:class:`Averaging`, its static settings with the pieces of the exchange. The transform,
its state and the streaming branches are in :mod:`wagrad._src.baselines`.

References:
  Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
  Models", arXiv 2311.08455.
  Douillard et al., "Streaming DiLoCo", 2025, arXiv 2501.18512.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import compression as compression_mod
from wagrad._src import periodic

_f32 = base.f32
_tmap = jax.tree_util.tree_map


def fragments(params, num_fragments: int) -> list[int]:
  """Leaf index -> fragment: the leaves in tree order cut into ``num_fragments``
  contiguous groups of about equal size (each at least one leaf), as Streaming DiLoCo
  cuts a model into groups of layers."""
  sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(params)]
  if len(sizes) < num_fragments:
    raise ValueError(f"`num_fragments`={num_fragments} but the parameters have only "
                     f"{len(sizes)} leaves: a fragment is a group of whole leaves.")
  mids = np.cumsum(sizes) - np.asarray(sizes) / 2
  frag = np.minimum((mids * num_fragments / sum(sizes)).astype(int), num_fragments - 1)
  for j in range(len(sizes)):  # keep every fragment non-empty, in order
    frag[j] = min(max(frag[j], frag[j - 1] if j else 0, num_fragments - (len(sizes) - j)),
                  j, (frag[j - 1] + 1) if j else 0)
  return [int(f) for f in frag]


def fragment_due(count, warmup_steps: int, sync_period: int, num_fragments: int):
  """The fragment exchanged at the end of step ``count`` (-1: none). After the warm-up,
  with ``s = count - warmup_steps + 1`` local steps done, fragment f is exchanged when
  ``s = o_f (mod H)``, ``o_f = floor(H (f + 1) / F)`` (torchft's streaming offsets; F = 1
  is the plain period)."""
  s = count - warmup_steps + 1
  due = jnp.int32(-1)
  for f in range(num_fragments):
    o = (sync_period * (f + 1)) // num_fragments
    due = jnp.where((s >= 1) & ((s - o) % sync_period == 0), f, due)
  return due


def parts(params, num_fragments):
  """The leaves of ``params`` as one list per fragment."""
  frag, leaves = fragments(params, num_fragments), jax.tree_util.tree_leaves(params)
  return [[x for x, g in zip(leaves, frag) if g == f] for f in range(num_fragments)]


def check_averaging(inner, sync_period, axis_name, warmup_steps, outer_optimizer,
                    opt_state_sync, exact, compression, update_alpha, num_fragments):
  """Validate :func:`model_averaging`'s arguments; return the period function."""
  if sync_period is None and outer_optimizer is not None:
    raise ValueError("`outer_optimizer` needs periodic exchanges: it cannot be used with "
                     "`sync_period=None` (one-shot averaging).")
  period_fn = periodic.check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name)
  if outer_optimizer is not None:
    base.check_transform("outer_optimizer", outer_optimizer)
    if not exact:
      raise ValueError("`exact=False` cannot be used with `outer_optimizer`: the outer "
                       "step needs x_global, which `exact=True` keeps.")
  compression_mod.check_mode(compression)
  base.check_range("update_alpha", update_alpha, 0.0, 1.0, hi_open=True)
  base.check_positive_int("num_fragments", num_fragments)
  for name, on in (("compression", compression is not None), ("update_alpha", update_alpha > 0),
                   ("num_fragments", num_fragments > 1)):
    if on and not exact:
      raise ValueError(f"`{name}` needs `exact=True`: it works from x_global, which "
                       "`exact=False` does not keep.")
    if on and sync_period is None:
      raise ValueError(f"`{name}` needs periodic exchanges, not `sync_period=None`.")
  if num_fragments > 1:
    if not isinstance(sync_period, (int, np.integer)) or sync_period < num_fragments:
      raise ValueError(f"`num_fragments`={num_fragments} needs an integer `sync_period` >= "
                       f"{num_fragments} (each fragment has its own step in the period), "
                       f"got {sync_period!r}.")
    if opt_state_sync != "local":
      raise ValueError("`num_fragments` > 1 keeps each worker's inner state: use "
                       "`opt_state_sync='local'`.")
  return period_fn


@dataclasses.dataclass(frozen=True)
class Averaging:
  """:func:`model_averaging`'s static settings and the pieces of its exchange."""
  axis_name: Any
  warmup_steps: int
  sync_period: Any
  F: int                    # fragments
  alpha: float              # update_alpha
  compression: str | None
  feedback: bool            # error feedback (with compression)
  outer_optimizer: Any

  def outer_init(self, params):
    """The outer optimizer's state: one, or one per fragment over its leaves (a list)."""
    if self.outer_optimizer is None:
      if self.F > 1:
        fragments(params, self.F)  # refuses too few leaves now, not at the first update
      return None
    if self.F == 1:
      return self.outer_optimizer.init(params)
    return tuple(self.outer_optimizer.init(part) for part in parts(params, self.F))

  def residuals(self, params):
    if self.F == 1:
      return compression_mod.residual_like(params)
    return tuple(compression_mod.residual_like(part) for part in parts(params, self.F))

  def global_mean(self, x_half, target, weight, error):
    """``(xbar, new_error)``: the mean of the finite, active workers' ``x_half``
    (``target`` if none), in float32, or through the compressed exchange."""
    if self.compression is None:
      return C.weighted_mean(x_half, weight, self.axis_name, fallback=target).value, error
    d = _tmap(lambda x, t: _f32(x) - _f32(t), x_half, target)
    include = (jnp.asarray(weight) > 0) & C.tree_is_finite(d)
    md, error, _ = compression_mod.compressed_mean(d, include, self.axis_name,
                                                   self.compression, error)
    return _tmap(lambda t, m: _f32(t) + m, target, md), error

  def outer_step(self, target, xbar, outer_state):
    """``(x_global, outer_state)`` after an exchange whose mean is ``xbar``."""
    if self.outer_optimizer is None:
      return base.tree_cast_like(xbar, target), outer_state
    ou, outer_state = self.outer_optimizer.update(base.tree_sub(target, xbar), outer_state,
                                                  target)
    return optax.apply_updates(target, ou), outer_state

  def take(self, target, x_half):
    """A worker's parameters after an exchange: x_global, or the update_alpha mix."""
    x = base.tree_cast_like(target, x_half)
    if self.alpha == 0:
      return x
    a, finite = self.alpha, C.tree_is_finite(x_half)
    return _tmap(lambda t, h: jnp.where(finite, ((1 - a) * _f32(t) + a * _f32(h))
                                        .astype(h.dtype), t), x, x_half)
