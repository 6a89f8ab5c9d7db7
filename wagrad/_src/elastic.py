"""The elastic exchange of EASGD (arXiv 1412.6651, eq. 5-6), written once.

From the pre-step values ``x_i``, the center ``x~`` and the local step ``u_i``, with
moving rate ``alpha``::

    x_i <- x_i + u_i - alpha (x_i - x~)
    x~  <- x~ + alpha sum_i (x_i - x~)

:func:`elastic_diff` forms ``x_i - x~``, :func:`center_exchange` the center's step (one
all-reduce, non-finite workers left out), :func:`elastic_update` the worker's step.
EASGD and EAMSGD (:mod:`wagrad._src.easgd`), tree EASGD's levels
(:mod:`wagrad._src.hierarchical`), the simulated asynchronous center
(:mod:`wagrad._src.simulated_async`) and the asynchronous master across processes
(:func:`exchange_with_one`, :mod:`wagrad._src.async_processes`) take their exchange from
here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import compression as compression_mod

_f32 = base.f32
_tmap = jax.tree_util.tree_map


def sqnorm(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return sum(jnp.sum(jnp.square(_f32(x))) for x in leaves).astype(jnp.float32)


def check_alpha_beta(alpha, beta):
  if alpha is not None:
    base.check_range("alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=True)
  base.check_range("beta", beta, 0.0, 1.0, lo_open=True)


def moving_rate(alpha, beta, axis_name, what="alpha"):
  """alpha, or beta / p with p the number of workers along ``axis_name`` (trace time)."""
  if alpha is not None:
    return float(alpha)
  p = lax.psum(1, axis_name)
  a = float(beta) / int(p)
  if not 0.0 < a < 1.0:
    raise ValueError(f"`{what}` = beta / p = {beta} / {p} = {a} must be in (0, 1): "
                     f"pass `{what}` explicitly or a smaller `beta`.")
  return a


def elastic_diff(params, u, center):
  """``x - c`` per leaf in float32, plus ``0 u``: the same values where ``u`` is finite,
  non-finite where it is not, so the exchange's one finiteness test covers the local
  step too (:func:`center_exchange`)."""
  return _tmap(lambda x, c, uu: _f32(x) - _f32(c) + 0.0 * _f32(uu), params, center, u)


def center_exchange(diff, a, axis_name, dist_axis=None):
  """The center's side of EASGD's elastic exchange (eq. 5-6) from ``diff`` =
  :func:`elastic_diff`.

  Returns ``(finite, center_step, distance)``: whether this worker is finite, the
  center's increment ``a sum_finite (x_i - c)`` (shared) and the mean squared distance
  of the finite workers to ``c`` (shared; over ``dist_axis`` when given).
  """
  # One reduction gives both the squared distance and the finiteness test: it is
  # non-finite iff an element of x or u is (0 * inf is NaN) or the squared distance
  # overflows float32; such a worker is left out.
  sq = jnp.asarray(sum(jnp.sum(jnp.square(d)) for d in jax.tree_util.tree_leaves(diff)),
                   jnp.float32)
  finite = jnp.isfinite(sq)
  masked = _tmap(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), diff)
  counts = jnp.stack([finite.astype(jnp.float32), jnp.where(finite, sq, 0.0)])
  psum = lambda v: lax.psum(v, axis_name)  # noqa: E731
  if dist_axis is None:
    # the two scalars ride in the same all-reduce as the center's step
    tot, (n_fin, sq_sum) = C.send((masked, counts), psum)
  else:
    tot = C.send(masked, psum)
    n_fin, sq_sum = lax.psum(counts, dist_axis)
  dist = sq_sum / jnp.maximum(n_fin, 1.0)
  return finite, _tmap(lambda t: a * t, tot), dist


def compressed_center_exchange(diff, a, axis_name, mode, error):
  """:func:`center_exchange` with ``sum_i (x_i - c)`` exchanged compressed
  (:func:`wagrad._src.compression.compressed_mean` times the finite workers' count).
  Returns ``(finite, center_step, distance, new_error)``."""
  sq = jnp.asarray(sum(jnp.sum(jnp.square(d)) for d in jax.tree_util.tree_leaves(diff)),
                   jnp.float32)
  finite = jnp.isfinite(sq)
  mean, error, count = compression_mod.compressed_mean(diff, finite, axis_name, mode, error)
  sq_sum = lax.psum(jnp.where(finite, sq, 0.0), axis_name)
  return (finite, _tmap(lambda m: a * count * m, mean), sq_sum / jnp.maximum(count, 1.0),
          error)


def elastic_update(u, diff, a, params):
  """The worker's side of the exchange: ``u - a (x - c)`` in the params' dtypes."""
  return _tmap(lambda uu, d, x: (_f32(uu) - a * d).astype(x.dtype), u, diff, params)


def elastic_exchange(params, u, center, a, axis_name, dist_axis=None):
  """Simultaneous elastic exchange of EASGD (eq. 5-6) from the pre-step values, inside
  a branch.

  Returns ``(updates, finite, center_step, distance)``: the worker's update
  ``u - a (x - c)`` (a non-finite worker is reset by :func:`reset_nonfinite` once
  the new center is known) and :func:`center_exchange`'s three.
  """
  diff = elastic_diff(params, u, center)
  finite, step, dist = center_exchange(diff, a, axis_name, dist_axis)
  return elastic_update(u, diff, a, params), finite, step, dist


def reset_nonfinite(upd, finite, new_center, params):
  """A non-finite worker moves to the new center (the update ``c_new - x``)."""
  return _tmap(lambda v, c, x: jnp.where(finite, v, (c.astype(x.dtype) - x)),
               upd, new_center, params)


def exchange_with_one(center, x, a):
  """The asynchronous master's side of one worker's exchange (Algorithm 1): the exchange
  of :func:`center_exchange` with that worker alone, so ``e = alpha (x - x~)`` and
  ``x~ <- x~ + e``. A non-finite ``x`` is left out: ``e = 0``, the center kept.
  Returns ``(new_center, e, finite)``."""
  def one(x):
    finite, step, _ = center_exchange(elastic_diff(x, x, center), a, "worker")
    return finite, step
  finite, e = jax.vmap(one, axis_name="worker", out_axes=(0, None))(
      _tmap(lambda v: v[None], x))
  return _tmap(lambda c, s: (_f32(c) + s).astype(c.dtype), center, e), e, finite[0]
