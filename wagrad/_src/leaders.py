"""Leader SGD's shared math (arXiv 1905.10395), written once: the running loss that
elects a leader, the election itself and the pull toward the leader::

    x_i <- x_i - c (x_i - L)        (c = pull; exact for the leader itself)

LSGD (:mod:`wagrad._src.lsgd`), multi-leader LSGD (:mod:`wagrad._src.multi_leader`),
the simulated asynchronous LSGD (:mod:`wagrad._src.simulated_async`) and the
asynchronous workers (:mod:`wagrad._src.async_processes`) take their rule from here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C

def _acc(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def pull(x, leader, c):
  """``x - c (x - L)`` per leaf, in float32 (or wider); exact for the leader itself."""
  def f(a, l):
    a32 = a.astype(_acc(a.dtype))
    return (a32 - c * (a32 - l.astype(a32.dtype))).astype(a.dtype)
  return jax.tree_util.tree_map(f, x, leader)


def sq_dist(x, y):
  return sum(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
             for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def elect_with_drift(run_loss, x, leader_copy, axis_name, taking_part=True):
  """Election at an exchange, and the drift metric from the same collective.

  The drift ``||x_i - L||^2`` to the leader copy ``L`` the workers were pulled toward
  until now is computed before the exchange, so it travels in the election's
  all-gather instead of a collective of its own after the new leader's broadcast. It
  is non-finite iff ``x_i`` is (``L``, an earlier leader, is finite) or it overflows:
  such a worker is neither elected nor counted. ``taking_part``: workers that stand
  and count (the others give NaN). Returns ``(Leader, mean drift)``.
  """
  d = jnp.where(taking_part, sq_dist(x, leader_copy), jnp.nan)
  return C.elect_leader_and_mean(run_loss, d, axis_name, eligible=jnp.isfinite(d))


def push_loss(buf, n, loss, active):
  """Write ``loss`` into the ring buffer (when active)."""
  size = buf.shape[0]
  new = buf.at[n % size].set(jnp.asarray(loss, jnp.float32))
  return jnp.where(active, new, buf), n + jnp.asarray(active, jnp.int32)


def running_mean(buf, n):
  """Mean of the last ``min(n, avg_size)`` losses; +inf (never elected) before any."""
  size = buf.shape[0]
  m = jnp.minimum(n, size)
  s = jnp.sum(jnp.where(jnp.arange(size) < m, buf, 0.0))
  return jnp.where(m > 0, s / jnp.maximum(m, 1).astype(jnp.float32), jnp.inf)


def one_hot(index, num_workers):
  if num_workers is None:
    return None
  return (jnp.arange(num_workers) == index).astype(jnp.float32)


def check_num_workers(mix_weights, axis_name):
  if mix_weights is None:
    return
  k = lax.psum(1, axis_name)
  if mix_weights.shape != (k,):
    raise ValueError(
        f"`num_workers`={mix_weights.shape[0]} given at construction but the worker axis "
        f"has {k} workers.")


def check_value(name, value):
  base.require_value(name, value)
  v = jnp.asarray(value)
  if v.ndim != 0:
    raise TypeError(f"{name}: `value` must be this worker's scalar loss, got shape {v.shape}.")
  return v.astype(jnp.float32)


def check_pull(name, value, allow_zero=False):
  base.check_range(name, value, 0.0, 1.0, lo_open=not allow_zero)


def check_proximal(name, value):
  base.check_range(name, value, 0.0, 1.0, hi_open=True)


def check_avg_size(avg_size, period, period_name):
  """The running-loss window: ``avg_size``, by default the period (the authors')."""
  if avg_size is None:
    if callable(period):
      raise ValueError(f"`avg_size` must be given when `{period_name}` is a schedule.")
    avg_size = period
  base.check_positive_int("avg_size", avg_size)
  return avg_size


def leader_fields(sh, L, leader, **changes):
  """Shared fields naming a new leader: its parameters, index and one-hot mix weights."""
  mix = sh.mix_weights
  return dict(leader_params=base.tree_cast_like(L, sh.leader_params),
              leader=jnp.asarray(leader, jnp.int32),
              mix_weights=None if mix is None else one_hot(leader, mix.shape[0]), **changes)
