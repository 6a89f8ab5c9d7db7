"""DOWNPOUR (Dean et al. 2012), the EASGD paper's baseline, with its momentum variant
MDOWNPOUR [reconstruction] and its asynchronous form on simulated own clocks.

[code: sixin-zh/mpiT asyncsgd/optim-downpour.lua] Each worker accumulates its local
updates over tau steps, pushes the sum to the master, the master adds it, and the
worker continues from the master's parameters::

    a_i <- a_i + u_i                   every step (u_i = inner(g_i), -eta g_i for SGD)
    x~  <- x~ + sum_i a_i;  x_i <- x~;  a_i <- 0        every tau steps

tau = 1 is plain asynchronous SGD. The model to evaluate is the master's
(``state.shared.center``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import periodic
from wagrad._src.base import AxisName, Period

_f32 = base.f32
_tmap = jax.tree_util.tree_map


@base.shared_state
class DownpourShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # the master's parameters (assigned exactly on exchanges; also
                            # `center`, the model to evaluate)
  momentum: Any             # MDOWNPOUR's master momentum buffer (or None)

  @property
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.target

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return self.center

  @property
  def center(self):
    return self.target


class DownpourState(NamedTuple):
  inner: Any                # inner optimizer state, per worker
  accumulated: Any          # sum of this worker's updates since its last push (float32)
  shared: DownpourShared
  own_steps: Any = None     # asynchronous: this worker's own (active) steps
  reset: Any = None         # asynchronous: this worker pushed and takes x_M exactly


@arguments.checked_arguments
def downpour(learning_rate: optax.ScalarOrSchedule | optax.GradientTransformation,
             sync_period: Period = 1, *, axis_name: AxisName = "workers",
             master_momentum: float = 0.0,
             asynchronous: bool = False) -> optax.GradientTransformationExtraArgs:
  """DOWNPOUR (and MDOWNPOUR), simulated synchronously or asynchronously.

  Each worker takes local steps ``u_i = inner(g_i)`` and accumulates
  ``Delta_i += u_i``; at the end of every ``sync_period``-th step all workers push::

      m   <- mu m + sum_i Delta_i      (mu = master_momentum; m = sum_i Delta_i if 0)
      x_M <- x_M + m
      x_i <- x_M,  Delta_i <- 0        (exact, with wagrad.apply_updates)

  All workers push in the same step (synchronous simulation of the asynchronous
  server), so ``sync_period=1`` is synchronous SGD with the summed (not averaged)
  updates. A non-finite worker's push is dropped (it still receives ``x_M``).
  MDOWNPOUR (``master_momentum > 0``) is a [reconstruction].

  ``asynchronous=True``: workers run at their own speeds (``active=`` masks from
  :mod:`wagrad` schedules; an inactive worker keeps its state) and each pushes after
  every ``sync_period`` of its *own* steps; pushes arriving in the same step are added
  together, and only the pushing workers take ``x_M`` (the others keep going). One
  worker pushing at a time, this is the parameter server of
  :func:`wagrad.async_.serve_downpour` across processes. Whether anyone pushes is by
  default a ``pmax`` of the per-worker flag (one scalar all-reduce every step); pass
  the precomputed shared flag instead (``any_exchange=``, row t of
  ``wagrad.schedules.async_report_steps(active, sync_period)[1]``) and no collective runs on
  steps without a push.

  Args:
    learning_rate: eta > 0 (local ``optax.sgd(eta)``), or an optax transform used as
      the local optimizer.
    sync_period: tau >= 1 or a schedule ``step -> period``.
    axis_name: the worker axis.
    master_momentum: mu in [0, 1).
    asynchronous: each worker on its own clock (``sync_period`` an integer; extra
      arguments per step: ``active=`` and, optional, the shared ``any_exchange=``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``DownpourState``.

  Example:
    >>> import wagrad
    >>> tx = wagrad.downpour(0.01, sync_period=4)

  References:
    Dean et al., "Large Scale Distributed Deep Networks", NeurIPS 2012; the EASGD
    paper's DOWNPOUR baseline, arXiv 1412.6651.
  """
  inner = _local_optimizer(learning_rate)
  period_fn = periodic.check_common(inner, sync_period, 0, "local", axis_name)
  base.check_range("master_momentum", master_momentum, 0.0, 1.0, hi_open=True)
  if asynchronous and (isinstance(sync_period, bool) or not isinstance(sync_period, int)
                       or sync_period < 1):
    raise ValueError(f"downpour(asynchronous=True) needs an integer `sync_period` >= 1 "
                     f"(each worker's own clock; no schedule), got {sync_period!r}.")
  cfg = _Downpour(periodic.inner_with_extra_args(inner), axis_name, float(master_momentum),
                  sync_period)
  inner = cfg.inner

  def init_fn(params):
    zeros = lambda: _tmap(lambda x: jnp.zeros(jnp.shape(x), _f32(x).dtype), params)  # noqa: E731
    return DownpourState(
        inner.init(params), zeros(),
        DownpourShared(**base.clock(0), target=base.tree_copy(params),
                       momentum=None if cfg.mu == 0 else zeros()),
        own_steps=jnp.zeros([], jnp.int32) if asynchronous else None,
        reset=jnp.bool_(False) if asynchronous else None)

  def update_fn(grads, state, params=None, *, active=None, any_exchange=None, **extra):
    base.refuse_renamed_flags("downpour", extra)
    if params is None:
      raise TypeError("downpour needs `params`: tx.update(grads, state, params).")
    for name, given in (("active", active), ("any_exchange", any_exchange)):
      if given is not None and not asynchronous:
        raise TypeError(f"downpour takes `{name}=` only with asynchronous=True.")
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    if asynchronous:
      return cfg.async_update(grads, state, params, active, any_exchange, extra)
    sh = state.shared
    u, inner_state = inner.update(grads, state.inner, params, **extra)
    acc = _tmap(lambda s, x: s + _f32(x), state.accumulated, u)
    ex = base.is_exchange_step(sh.count, sh.last_exchange, 0, period_fn)

    def exchange(x_half):
      """The master adds every (finite) worker's accumulated update; the workers take
      the master's parameters."""
      return cfg.push(sh, acc, True), True

    x_new, new_shared, _, _ = periodic.exchange_step(
        ex.astype(jnp.int32), sh, base.tree_add(params, u), exchange, warmup_steps=0,
        axis_name=axis_name, assign=ex)
    upd = periodic.updates_to(x_new, params)
    acc = _tmap(lambda a: jnp.where(ex, jnp.zeros_like(a), a), acc)
    return upd, DownpourState(inner_state, acc, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _local_optimizer(learning_rate):
  """DOWNPOUR's local optimizer: a given optax transform, else ``optax.sgd(eta)``."""
  if hasattr(learning_rate, "init") and hasattr(learning_rate, "update"):
    return learning_rate
  if not callable(learning_rate):
    base.check_range("learning_rate", learning_rate, 0.0, np.inf, lo_open=True)
  return optax.sgd(learning_rate)


def _shared_flag(any_exchange):
  """``any_exchange=`` as one bool; a TypeError naming the fix for a table or a row."""
  anyone = jnp.asarray(base.unshared(any_exchange), jnp.bool_)
  if anyone.ndim != 0:
    raise TypeError(
        f"`any_exchange` must be one shared flag for this step, got shape {anyone.shape}: "
        f"pass row t of `wagrad.schedules.async_report_steps(active, sync_period)[1]`, wrapped "
        f"in `wagrad.Shared` so that every worker reads the same value.")
  return anyone


def master_step(target, momentum, acc, pushing, mu, axis_name):
  """The master adds the pushing (finite) workers' accumulated updates:
  ``m <- mu m + sum_i Delta_i``, ``x_M <- x_M + m`` (``m`` None when mu = 0). Returns
  the master's new ``(x_M, m)``; a worker's non-finite ``Delta_i`` is left out."""
  finite = C.tree_is_finite(acc) & pushing
  tot = C.send(_tmap(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), acc),
               lambda v: lax.psum(v, axis_name))
  if mu == 0:
    momentum, step = None, tot
  else:
    momentum = _tmap(lambda m, t: mu * m + t, momentum, tot)
    step = momentum
  return _tmap(lambda xm, s: (_f32(xm) + s).astype(xm.dtype), target, step), momentum


def push_from_one(target, momentum, delta, mu):
  """The asynchronous master's side of one worker's push across processes:
  :func:`master_step` with that worker alone (jit it with ``mu`` static)."""
  return jax.vmap(lambda d: master_step(target, momentum, d, True, mu, "worker"),
                  axis_name="worker", out_axes=None)(_tmap(lambda v: v[None], delta))


@dataclasses.dataclass(frozen=True)
class _Downpour:
  """:func:`downpour`'s settings and the master's side of a push."""
  inner: Any
  axis_name: Any
  mu: float                 # master_momentum
  sync_period: Any

  def push(self, sh, acc, pushing):
    """The master's side of this step's pushes (:func:`master_step`)."""
    target, momentum = master_step(sh.target, sh.momentum, acc, pushing, self.mu,
                                   self.axis_name)
    return dict(target=target, momentum=momentum)

  def async_update(self, grads, state, params, active, any_exchange, extra):
    """Own clocks: worker i pushes after every tau-th of its active steps."""
    sh = state.shared
    act = jnp.bool_(True) if active is None else jnp.asarray(base.unshared(active), jnp.bool_)
    u, new_inner = self.inner.update(grads, state.inner, params, **extra)
    u = _tmap(lambda x: jnp.where(act, x, jnp.zeros_like(x)), u)
    inner_state = base.tree_where(act, new_inner, state.inner)
    acc = _tmap(lambda s, x: s + _f32(x), state.accumulated, u)
    own = state.own_steps + act.astype(jnp.int32)
    pushing = act & (own % self.sync_period == 0)
    anyone = (lax.pmax(pushing.astype(jnp.int32), self.axis_name) > 0 if any_exchange is None
              else _shared_flag(any_exchange))
    clock = periodic.next_clock(anyone.astype(jnp.int32), sh, False)
    new_shared = lax.cond(
        anyone, lambda: dataclasses.replace(sh, **clock, **self.push(sh, acc, pushing)),
        lambda: dataclasses.replace(sh, **clock))
    x_half = base.tree_add(params, u)
    x_new = base.tree_where(pushing, base.tree_cast_like(new_shared.target, x_half), x_half)
    acc = _tmap(lambda a: jnp.where(pushing, jnp.zeros_like(a), a), acc)
    return periodic.updates_to(x_new, params), DownpourState(
        inner_state, acc, new_shared, own, pushing)
