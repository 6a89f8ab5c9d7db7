"""Baselines: synchronous all-reduce SGD, periodic model averaging (local SGD, with an
optional outer optimizer = DiLoCo), one-shot averaging (SimuParallel SGD), DOWNPOUR.

Equations (p workers, worker i, inner optimizer step ``u_i = inner(g_i)``):

* ``sync_sgd``:            x <- x + inner(mean_i g_i)            every step
* ``model_averaging``:     x_i <- x_i + inner(g_i); every tau steps
                           x_i <- xbar = mean_j x_j               (exact assignment)
  with ``outer_optimizer``: Delta = x_global - xbar (pseudo-gradient),
                           x_global <- x_global + outer(Delta), x_i <- x_global
* one-shot averaging:      ``sync_period=None``: no communication during training;
                           :func:`one_shot_average` returns mean_i x_i at the end.

* **DOWNPOUR** [code: the EASGD authors' baseline]: the worker accumulates its updates
  over tau local steps; the master adds every worker's accumulated update to its
  parameters and the workers receive the master's parameters (exact assignment).
  Simulated synchronously (all workers push in the same step). MDOWNPOUR, momentum on
  the master's update (``master_momentum``), is a [reconstruction].

References:
  Zinkevich et al., "Parallelized Stochastic Gradient Descent", NeurIPS 2010.
  Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020 (post-local SGD).
  Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
  Models", arXiv 2311.08455.
  Dean et al., "Large Scale Distributed Deep Networks", NeurIPS 2012 (DOWNPOUR).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import periodic

_f32 = base.f32
_tmap = jax.tree_util.tree_map


@base.shared_state
class SyncShared:
  count: jax.Array


class SyncSGDState(NamedTuple):
  inner: Any
  shared: SyncShared


def sync_sgd(inner: optax.GradientTransformation, *, axis_name="workers"
             ) -> optax.GradientTransformationExtraArgs:
  """Synchronous all-reduce SGD: gradients averaged over workers every step.

  ``x <- x + inner(mean_i g_i)``. Workers that start equal stay equal. There is no
  parameter exchange, so nothing heals a worker whose parameters went non-finite: its
  gradient makes the mean non-finite on every worker (put ``optax.apply_if_finite``
  inside as ``inner`` to skip such steps everywhere, or use :func:`model_averaging`,
  which leaves a non-finite worker out and resets it).

  Args:
    inner: the local optimizer (any optax transform).
    axis_name: the worker axis.

  Returns:
    A ``GradientTransformationExtraArgs``; extra args (e.g. ``value=``) go to ``inner``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.sync_sgd(optax.sgd(0.1))
  """
  base.check_transform("inner", inner)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    return SyncSGDState(inner.init(params), SyncShared(jnp.zeros([], jnp.int32)))

  def update_fn(grads, state, params=None, **extra):
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params if params is not None else grads)
    g = C.pmean_tree(grads, axis_name)
    u, inner_state = inner.update(g, state.inner, params, **extra)
    return u, SyncSGDState(inner_state, SyncShared(state.shared.count + 1))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@base.shared_state
class AveragingShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # global parameters after the last exchange (DiLoCo's
                            # x_global)
  outer: Any                # outer optimizer state (or None)

  @property
  def exchanged(self):
    """This step exchanged (or ended the warm-up): drives wagrad.sync_model_state, also
    with ``exact=False``, where nothing is assigned."""
    return (self.last_exchange == self.count) & (self.count > 0)


class ModelAveragingState(NamedTuple):
  inner: Any
  shared: AveragingShared


def model_averaging(inner: optax.GradientTransformation, sync_period=1, *,
                    axis_name="workers", warmup_steps: int = 0,
                    outer_optimizer: optax.GradientTransformation | None = None,
                    opt_state_sync: str = "local", exact: bool = True
                    ) -> optax.GradientTransformationExtraArgs:
  """Periodic model averaging (local SGD / post-local SGD), optionally with DiLoCo's
  outer optimizer.

  Every step each worker takes a local step ``x_i <- x_i + inner(g_i)``. At the end of
  every ``sync_period``-th step after the warm-up the workers exchange::

      xbar = mean over finite workers of x_i
      x_global <- xbar                                  (no outer optimizer)
      x_global <- x_global + outer(x_global - xbar)     (outer optimizer, DiLoCo)
      x_i <- x_global                                    for every worker

  Use :func:`wagrad.apply_updates` to take ``x_global`` bit-exactly on exchange steps.
  A worker whose parameters are non-finite is left out of the mean (and receives the
  mean); if all are non-finite the workers go back to the last ``x_global``.
  ``update(..., active=a)`` (a per-worker bool, e.g. a row of
  :func:`wagrad.speed_schedule`) simulates stragglers and dropped workers: an inactive
  worker takes no local step, has weight 0 in the mean, and still receives it, so a
  rejoining worker is resynchronised at the next exchange.
  ``sync_period`` counts calls of ``update`` (wrap ``optax.MultiSteps`` *inside*,
  ``model_averaging(optax.MultiSteps(...).gradient_transformation(), ...)``, to count
  micro-steps).

  Args:
    inner: the local optimizer (any optax transform).
    sync_period: tau >= 1, or a schedule ``step -> period`` (e.g. growing as the
      learning rate decays), or ``None`` for one-shot averaging (no communication;
      call :func:`one_shot_average` at the end).
    axis_name: the worker axis.
    warmup_steps: synchronous all-reduce SGD for this many steps first (post-local SGD).
    outer_optimizer: optax transform applied at each exchange to the pseudo-gradient
      ``x_global - xbar``; ``optax.sgd(1.0)`` is plain averaging.
    opt_state_sync: ``"local"`` (keep each worker's inner state; default, as DiLoCo),
      ``"average"`` (average its floating leaves at exchanges) or ``"reset"``.
    exact: keep ``x_global`` in the (shared, replicated) state so that
      :func:`wagrad.apply_updates` assigns it bit-exactly (default). ``False`` keeps no
      parameter-sized copy -- one model's worth of memory less on every device and one
      buffer less per step: the update is ``xbar - x_i`` and ``x_i + (xbar - x_i)``
      may differ from ``xbar`` (and between workers) in the last bits until the next
      exchange; if no worker is finite each keeps its own parameters. Not with
      ``outer_optimizer``, which needs ``x_global``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``ModelAveragingState``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.model_averaging(optax.sgd(0.1), sync_period=4, warmup_steps=10)

  References:
    Lin et al., 2020, arXiv 1808.07217; Douillard et al., 2023, arXiv 2311.08455.
  """
  if sync_period is None and outer_optimizer is not None:
    raise ValueError("`outer_optimizer` needs periodic exchanges: it cannot be used with "
                     "`sync_period=None` (one-shot averaging).")
  period_fn = periodic.check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name)
  if outer_optimizer is not None:
    base.check_transform("outer_optimizer", outer_optimizer)
    if not exact:
      raise ValueError("`exact=False` cannot be used with `outer_optimizer`: the outer "
                       "step needs x_global, which `exact=True` keeps.")
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    return ModelAveragingState(inner.init(params), AveragingShared(
        **base.clock(0), target=base.tree_copy(params) if exact else None,
        outer=None if outer_optimizer is None else outer_optimizer.init(params)))

  def update_fn(grads, state, params=None, *, active=None, **extra):
    if params is None:
      raise TypeError("model_averaging needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    sh = state.shared
    u, inner_state = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    weight = 1.0
    if active is not None:  # simulated straggler / dropped worker: no local step, weight 0
      active = jnp.asarray(active, bool)
      u = jax.tree_util.tree_map(lambda x: jnp.where(active, x, jnp.zeros_like(x)), u)
      inner_state = base.tree_where(active, inner_state, state.inner)
      weight = active.astype(jnp.float32)
    x_half = base.tree_add(params, u)
    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)

    def exchange(x_half):
      """xbar = mean_i x_i (finite, active workers); DiLoCo: x_global <- x_global +
      outer(x_global - xbar). Every worker takes the result."""
      xbar = C.weighted_mean(x_half, weight, axis_name,
                             fallback=sh.target if exact else x_half).value
      if not exact:
        return {}, xbar  # no stored x_global: the mean itself leaves the branch
      if outer_optimizer is None:
        return {"target": base.tree_cast_like(xbar, sh.target)}, True
      last = sh.target
      ou, outer_state = outer_optimizer.update(base.tree_sub(last, xbar), sh.outer, last)
      return {"target": optax.apply_updates(last, ou), "outer": outer_state}, True

    x_new, shared, inner_state, _ = periodic.exchange_step(
        idx, sh, x_half, exchange, warmup_steps=warmup_steps, axis_name=axis_name,
        assign=(idx != periodic.NO_EXCHANGE) if exact else False,
        opt_state=(opt_state_sync, inner, inner_state),
        aux_is_params=not exact)
    return periodic.updates_to(x_new, params), ModelAveragingState(inner_state, shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diloco(inner_learning_rate=4e-4, outer_learning_rate=0.7, sync_period=50, *,
           outer_momentum=0.9, inner_weight_decay=0.1, axis_name="workers",
           warmup_steps: int = 0, inner: optax.GradientTransformation | None = None
           ) -> optax.GradientTransformationExtraArgs:
  """DiLoCo: inner AdamW, outer SGD with Nesterov momentum on the pseudo-gradient.

  ``model_averaging(adamw(inner_lr, weight_decay), sync_period=H,
  outer_optimizer=sgd(outer_lr, momentum, nesterov=True))``. The learning rates and
  momentum are the DiLoCo paper's (inner AdamW 4e-4, outer lr 0.7, momentum 0.9); its
  H = 500 suits runs of tens of thousands of steps, and a run shorter than H steps would
  never exchange (the workers would never meet), so the default here is H = 50, which
  exchanges in a run of a few hundred steps. Pass ``sync_period=500`` for the paper's.

  Example:
    >>> import wagrad
    >>> tx = wagrad.diloco(inner_learning_rate=1e-3, sync_period=500)  # the paper's H

  References:
    Douillard et al., "DiLoCo", arXiv 2311.08455.
  """
  if inner is None:
    inner = optax.adamw(inner_learning_rate, weight_decay=inner_weight_decay)
  outer = optax.sgd(outer_learning_rate, momentum=outer_momentum, nesterov=True)
  return model_averaging(inner, sync_period, axis_name=axis_name, warmup_steps=warmup_steps,
                         outer_optimizer=outer)


def one_shot_average(params, axis_name="workers"):
  """SimuParallel SGD's output: mean over (finite) workers of their final parameters.

  Call it inside a mapped function at the end of training. Returns ``Weighted`` (the
  mean, each worker's weight, ok).
  """
  return C.weighted_mean(params, 1.0, axis_name)


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
  def center(self):
    return self.target


class DownpourState(NamedTuple):
  inner: Any                # inner optimizer state, per worker
  accumulated: Any          # sum of this worker's updates since its last push (float32)
  shared: DownpourShared


def downpour(learning_rate, sync_period=1, *, axis_name="workers",
             master_momentum: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """DOWNPOUR (and MDOWNPOUR), simulated synchronously.

  Each worker takes local steps ``u_i = inner(g_i)`` and accumulates
  ``Delta_i += u_i``; at the end of every ``sync_period``-th step all workers push::

      m   <- mu m + sum_i Delta_i      (mu = master_momentum; m = sum_i Delta_i if 0)
      x_M <- x_M + m
      x_i <- x_M,  Delta_i <- 0        (exact, with wagrad.apply_updates)

  All workers push in the same step (synchronous simulation of the asynchronous
  server), so ``sync_period=1`` is synchronous SGD with the summed (not averaged)
  updates. A non-finite worker's push is dropped (it still receives ``x_M``).
  MDOWNPOUR (``master_momentum > 0``) is a [reconstruction].

  Args:
    learning_rate: eta > 0 (local ``optax.sgd(eta)``), or an optax transform used as
      the local optimizer.
    sync_period: tau >= 1 or a schedule ``step -> period``.
    axis_name: the worker axis.
    master_momentum: mu in [0, 1).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``DownpourState``.

  Example:
    >>> import wagrad
    >>> tx = wagrad.downpour(0.01, sync_period=4)

  References:
    Dean et al., "Large Scale Distributed Deep Networks", NeurIPS 2012; the EASGD
    paper's DOWNPOUR baseline, arXiv 1412.6651.
  """
  if hasattr(learning_rate, "init") and hasattr(learning_rate, "update"):
    inner = learning_rate
  elif callable(learning_rate):
    inner = optax.sgd(learning_rate)
  else:
    base.check_range("learning_rate", learning_rate, 0.0, np.inf, lo_open=True)
    inner = optax.sgd(learning_rate)
  period_fn = periodic.check_common(inner, sync_period, 0, "local", axis_name)
  base.check_range("master_momentum", master_momentum, 0.0, 1.0, hi_open=True)
  mu = float(master_momentum)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    p = base.tree_copy(params)
    return DownpourState(
        inner.init(params), _tmap(lambda x: jnp.zeros(jnp.shape(x), _f32(x).dtype), params),
        DownpourShared(
            **base.clock(0), target=p,
            momentum=None if mu == 0 else _tmap(
                           lambda x: jnp.zeros(jnp.shape(x), _f32(x).dtype), params)))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("downpour needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    sh = state.shared
    u, inner_state = inner.update(grads, state.inner, params, **extra)
    acc = _tmap(lambda s, x: s + _f32(x), state.accumulated, u)
    ex = base.is_exchange_step(sh.count, sh.last_exchange, 0, period_fn)

    def exchange(x_half):
      """The master adds every (finite) worker's accumulated update; the workers take
      the master's parameters."""
      finite = C.tree_is_finite(acc)
      tot = C.send(_tmap(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), acc),
                   lambda v: lax.psum(v, axis_name))
      if mu == 0:
        mom, step = None, tot
      else:
        mom = _tmap(lambda m, t: mu * m + t, sh.momentum, tot)
        step = mom
      master = _tmap(lambda xm, s: (_f32(xm) + s).astype(xm.dtype), sh.target, step)
      return dict(target=master, momentum=mom), True

    x_new, new_shared, _, _ = periodic.exchange_step(
        ex.astype(jnp.int32), sh, base.tree_add(params, u), exchange, warmup_steps=0,
        axis_name=axis_name, assign=ex)
    upd = periodic.updates_to(x_new, params)
    acc = _tmap(lambda a: jnp.where(ex, jnp.zeros_like(a), a), acc)
    return upd, DownpourState(inner_state, acc, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
