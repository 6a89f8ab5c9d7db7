"""Asynchronous algorithms simulated in one lockstep program: async EASGD, async LSGD.

Each worker has its own clock (its active steps, from a seeded activity schedule,
:mod:`wagrad._src.schedules`) and exchanges with a master when its own clock says so;
the program still runs in lockstep, and the master's side is computed from
collectives on the steps where anyone exchanges (design.md, One clock).

* **Asynchronous EASGD** [code] (arXiv 1412.6651, Algorithm 1): worker i with its own
  clock ``t_i`` exchanges at an active step when ``t_i mod tau == 0`` (also at
  ``t_i = 0``)::

      e = alpha (x_i - x~);  x~ <- x~ + e;  x_i <- x_i - eta g_i(x_i) - e

  Several workers exchanging in one global step reach the master in ascending worker
  order, each seeing the center left by the previous one (``order="sequential"``, the
  closed form ``x~_m = (1-alpha)^m x~ + sum_k alpha (1-alpha)^(m-1-r_k) x_k``), or all
  see the same center (``order="simultaneous"``). The ordering of simultaneous
  arrivals is a simulation choice, not the paper's.
* **Asynchronous LSGD** [reconstruction] (arXiv 1905.10395): a master keeps the current
  leader and its loss; every ``tau`` of its *own* local steps a worker reports its
  parameters and running loss; the master's leader is replaced when the report's loss
  is lower; the reporting worker is pulled toward the master's leader.

Non-finite workers: as in synchronous EASGD / LSGD, a worker whose parameters are
non-finite when it exchanges (reports) is left out of the center's update (never
elected) and takes the new center (the master's leader) exactly through its state's
``reset`` flag and :func:`wagrad.apply_updates`, with a fresh inner state.

For staleness-aware n-softsync SGD see :mod:`wagrad._src.staleness`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import optax
from jax import lax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import evaluate
from wagrad._src import collectives as C
from wagrad._src import periodic
from wagrad._src import elastic
from wagrad._src import leaders
from wagrad._src.base import AxisName, Period

_f32 = base.f32
_tmap = jax.tree_util.tree_map
ORDERS = ("sequential", "simultaneous")

@arguments.checked_arguments(where="wagrad.schedules")
def async_easgd_schedule(active: npt.ArrayLike, sync_period: Period
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Which workers exchange at which global step in :func:`async_easgd` (NumPy).

  Worker i's clock ``t_i`` counts its own active steps; it exchanges at an active
  step where ``t_i mod tau == 0`` (its first active step included); with a schedule,
  at ``t_i = 0`` and then ``period(t_i)`` of its own steps after each exchange.

  Args:
    active: bool ``[T, K]`` activity masks (e.g. ``wagrad`` speed schedules).
    sync_period: tau >= 1, or a schedule ``own clock -> period``.

  Returns:
    ``(exchange, any_exchange)``: bool ``[T, K]`` and bool ``[T]``. Pass
    ``any_exchange[t]`` to ``tx.update(..., any_exchange=...)`` as a value shared by
    every worker (e.g. wrapped in ``wagrad.Shared`` in the mapped step's arguments).
  """
  periodic.require_period("sync_period", sync_period)
  active = np.asarray(active, dtype=bool)
  if active.ndim != 2:
    raise ValueError(f"`active` must have shape [T, K], got {active.shape}.")
  clock = np.cumsum(active, axis=0) - active  # active steps before step t
  if not callable(sync_period):
    exchange = active & (clock % sync_period == 0)
  else:
    exchange = periodic.own_clock_table(active, clock, sync_period, first_due=0)
  return exchange, exchange.any(axis=1)


@base.shared_state
class AsyncEASGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # always None (no exact assignment)
  center: Any               # the master's center variable x~
  distance: jax.Array       # mean ||x_i - x~_seen||^2 of the workers of the last exchange
  num_exchanging: jax.Array  # workers that exchanged in the last step

  @property
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.target if self.target is not None else self.center

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return self.center


class AsyncEASGDState(NamedTuple):
  inner: Any                # inner optimizer state, per worker
  clock: jax.Array          # t_i: this worker's own active steps, per worker
  shared: AsyncEASGDShared
  reset: Any                # per worker: non-finite at its exchange, so it takes the
                            # new center (exactly, through wagrad.apply_updates)
  due: Any = None           # with a period schedule: the clock of the next exchange


def _async_centers(order, params, c, ex, a, axis_name):
  """Asynchronous EASGD's master over the workers exchanging this step (``ex``), in
  ``order``: ``(seen, new_c, m)``, the center this worker sees (float32), the center
  after all of them and how many exchanged.

  Sequential, by worker index: with ``r`` this worker's rank among the ``m``
  exchanging workers, ``c_r = (1-a)^r c + sum_{rank_k < r} a (1-a)^(r-1-rank_k) x_k``
  and ``c_m`` likewise. Simultaneous: every one sees ``c``, and
  ``c <- c + a sum_k (x_k - c)``."""
  ex_all = C.all_gather(ex, axis_name)                       # [K], shared
  rank_all = jnp.cumsum(ex_all.astype(jnp.int32)) - ex_all.astype(jnp.int32)
  m = jnp.sum(ex_all.astype(jnp.int32))
  r = rank_all[lax.axis_index(axis_name)]
  one_m = jnp.float32(1.0 - a)
  if order == "simultaneous":
    step = C.send(_tmap(lambda x, cc: jnp.where(ex, a * (_f32(x) - _f32(cc)),
                                                 jnp.zeros_like(_f32(x))), params, c),
                  lambda v: lax.psum(v, axis_name))
    return _tmap(_f32, c), _tmap(lambda cc, s: (_f32(cc) + s).astype(cc.dtype), c, step), m
  xs = C.all_gather(_tmap(lambda x: jnp.where(ex, _f32(x), jnp.zeros_like(_f32(x))),
                          params), axis_name)              # [K, ...], shared
  rf = rank_all.astype(jnp.float32)
  w_seen = jnp.where(ex_all & (rank_all < r),
                     a * jnp.power(one_m, r.astype(jnp.float32) - 1.0 - rf), 0.0)
  w_end = jnp.where(ex_all, a * jnp.power(one_m, m.astype(jnp.float32) - 1.0 - rf), 0.0)

  def comb(w, scale, cc, x):
    return scale * _f32(cc) + jnp.tensordot(w, x, axes=1)

  seen = _tmap(lambda cc, x: comb(w_seen, jnp.power(one_m, r.astype(jnp.float32)), cc, x),
               c, xs)
  new_c = _tmap(lambda cc, x: comb(w_end, jnp.power(one_m, m.astype(jnp.float32)), cc,
                                   x).astype(cc.dtype), c, xs)
  return seen, new_c, m


@arguments.checked_arguments
def async_easgd(inner: optax.GradientTransformation, sync_period: Period = 1, *,
                alpha: float | None = None, beta: float = 0.9,
                axis_name: AxisName = "workers", order: str = "sequential"
                ) -> optax.GradientTransformationExtraArgs:
  """Asynchronous EASGD (Algorithm 1), simulated with per-step activity masks.

  Call ``tx.update(grads, state, params, active=active_i, any_exchange=flag)``:
  ``active_i`` says whether this worker finishes a local step at this global step
  (from a seeded schedule), ``flag`` whether *any* worker exchanges at this step
  (``async_easgd_schedule(active, tau)[1][t]``, the same on every worker). An active
  worker with clock ``t_i``::

      if t_i mod tau == 0:  e = alpha (x_i - x~);  x~ <- x~ + e;  x_i <- x_i + u_i - e
      else:                 x_i <- x_i + u_i
      t_i <- t_i + 1

  with ``u_i = inner(g_i(x_i))``. Several workers exchanging in one global step:
  ``order="sequential"`` (default) applies them in ascending worker index, each
  seeing the center left by the previous one; ``"simultaneous"`` lets all see the
  same ``x~`` (the center moves by ``alpha sum e``). An inactive worker returns zero
  updates and keeps its inner state and clock. A worker whose parameters or local
  step are non-finite at its exchange is left out of the center's update and takes
  the new center (exactly, with :func:`wagrad.apply_updates`) with a fresh inner
  state.

  Communication: the exchange (an all-gather of the exchanging workers' parameters
  for ``"sequential"``, a sum for ``"simultaneous"``) runs only on steps where
  ``any_exchange`` is true. Without ``any_exchange`` it is decided by a scalar
  ``pmax`` of the workers' "I exchange" flags, i.e. a tiny collective every step.

  Args:
    inner: the local optimizer (``optax.sgd(eta)`` is the paper's).
    sync_period: tau >= 1 on each worker's own clock, or a schedule
      ``own clock -> period``: a worker exchanges at its first active step and then
      ``period(t_i)`` of its own steps after each exchange.
    alpha: moving rate in (0, 1); default ``beta / p``.
    beta: in (0, 1], used when ``alpha`` is None.
    axis_name: the worker axis.
    order: ``"sequential"`` or ``"simultaneous"``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``AsyncEASGDState``;
    ``shared.num_exchanges`` counts worker-master exchanges.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.async_easgd(optax.sgd(0.1), sync_period=4)

  References:
    Zhang, Choromanska, LeCun, 2015, arXiv 1412.6651, Algorithm 1.
  """
  base.check_transform("inner", inner)
  period_fn = periodic.require_period("sync_period", sync_period)
  elastic.check_alpha_beta(alpha, beta)
  if order not in ORDERS:
    raise ValueError(f"unknown `order` {order!r}; choose one of {ORDERS}.")
  if not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")
  inner = periodic.inner_with_extra_args(inner)
  scheduled = callable(sync_period)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return AsyncEASGDState(inner.init(params), zero, AsyncEASGDShared(
        **base.clock(0), target=None,
        center=base.tree_copy(params), distance=jnp.zeros([], jnp.float32),
        num_exchanging=zero), jnp.bool_(False), due=zero if scheduled else None)

  def update_fn(grads, state, params=None, *, active=True, any_exchange=None, **extra):
    if params is None:
      raise TypeError("async_easgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    a = elastic.moving_rate(alpha, beta, axis_name)
    sh = state.shared
    act = jnp.asarray(base.unshared(active), jnp.bool_)
    base.refuse_renamed_flags("async_easgd", extra)
    any_exchange = base.unshared(any_exchange)
    u, new_inner = inner.update(grads, state.inner, params, **extra)
    u = _tmap(lambda x: jnp.where(act, x, jnp.zeros_like(x)), u)
    inner_state = base.tree_where(act, new_inner, state.inner)
    if scheduled:
      me = act & (state.clock == state.due)
      due = jnp.where(me, state.clock + period_fn(state.clock), state.due)
    else:
      me = act & (state.clock % sync_period == 0)
      due = None
    if any_exchange is None:
      pred = lax.pmax(me.astype(jnp.int32), axis_name) > 0
    else:
      pred = jnp.asarray(any_exchange, jnp.bool_)

    # The update goes through the branch: it needs the center as seen.
    def shared_after(n_me, **changes):
      clock = base.clock(sh.count + 1,
                              jnp.where(pred, sh.count + 1, sh.last_exchange),
                              sh.num_exchanges + n_me, False)
      return dataclasses.replace(sh, **clock, num_exchanging=jnp.asarray(n_me, jnp.int32),
                          **changes)

    def local(u):
      return u, shared_after(jnp.zeros([], jnp.int32)), jnp.bool_(False)

    def exchange(u):
      finite = C.tree_is_finite(params) & C.tree_is_finite(u)
      ex = me & finite
      n_me = jnp.sum(C.all_gather(me, axis_name).astype(jnp.int32))
      seen, new_c, m = _async_centers(order, params, sh.center, ex, a, axis_name)
      diff = _tmap(lambda x, s: _f32(x) - s, params, seen)
      upd = _tmap(lambda uu, d, x: jnp.where(ex, _f32(uu) - a * d, _f32(uu)).astype(x.dtype),
                  u, diff, params)
      # a non-finite exchanging worker is left out of the master and reset to it
      reset = me & ~finite
      upd = _tmap(lambda v, cc, x: jnp.where(reset, cc.astype(x.dtype) - x, v),
                  upd, new_c, params)
      dist = lax.psum(jnp.where(ex, elastic.sqnorm(diff), 0.0), axis_name) / jnp.maximum(
          m.astype(jnp.float32), 1.0)
      return upd, shared_after(n_me, center=new_c,
                               distance=jnp.asarray(dist, jnp.float32)), reset

    upd, new_shared, reset = lax.cond(pred, exchange, local, u)
    inner_state = periodic.reset_inner_where(
        reset, inner, inner_state, base.tree_cast_like(new_shared.center, params), pred)
    clock = state.clock + act.astype(jnp.int32)
    return upd, AsyncEASGDState(inner_state, clock, new_shared, reset, due)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@base.shared_state
class AsyncLSGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  num_replacements: jax.Array # times the master's leader was replaced
  leader_params: Any          # the master's leader (also `target`: what a reset
                              # worker takes; `assign` stays False)
  leader: jax.Array           # worker that sent it (-1: the initial parameters)
  leader_loss: jax.Array      # its running loss when it was sent (+inf initially)
  pull_distance: jax.Array    # mean over reporting workers of ||x_i - leader||^2,
                              # the master's leader before their report

  @property
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.leader_params

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return evaluate.leader_model(params, self.leader, self.leader_params)

  @property
  def target(self):
    return self.leader_params


class AsyncLSGDState(NamedTuple):
  inner: Any
  losses: jax.Array
  num_losses: jax.Array
  local_count: jax.Array      # this worker's own local steps (its clock)
  shared: AsyncLSGDShared
  reset: Any                  # per worker: non-finite at its report, so it takes the
                              # master's leader (exactly, through wagrad.apply_updates)
  due: Any = None             # with a period schedule: the local count of the next report


@arguments.checked_arguments
def async_lsgd(inner: optax.GradientTransformation, sync_period: Period = 4, *,
               pull: float = 0.1, avg_size: int | None = None,
               axis_name: AxisName = "workers") -> optax.GradientTransformationExtraArgs:
  """Asynchronous LSGD with a master holding the leader [reconstruction].

  Workers run at their own speeds (``active=`` masks from :mod:`wagrad` schedules);
  a worker reports after every ``tau`` of its *own* local steps::

      active worker:     x_i <- x_i + inner(g_i),   n_i <- n_i + 1
      reports R = {i : active_i and n_i % tau == 0}
      l = argmin_{i in R} r_i;  if r_l < r_master:  L <- x_l,  r_master <- r_l
      i in R:            x_i <- x_i - pull (x_i - L)

  The master state (``L``, its loss, the worker it came from) is shared; reports
  arriving in the same step are handled together (simultaneous arrival). The
  collectives run inside a ``lax.cond`` on "does anyone report this step": by
  default a ``pmax`` of the per-worker flag (one scalar all-reduce every step); pass
  the precomputed shared flag (``any_exchange=``, a row of :func:`async_report_steps`)
  to avoid even that. Inactive workers keep their state unchanged and are neither
  elected nor pulled. A reporting worker whose parameters are non-finite is never
  elected and takes the master's new ``L`` (exactly, with :func:`wagrad.apply_updates`)
  with a fresh inner state. This rule is reconstructed from the paper's description (its
  full text and code for this variant were not available); the authors' public code
  instead runs blocking rounds after uneven local steps (:func:`uneven_round_steps`).

  Args:
    inner: the local optimizer.
    sync_period: tau >= 1, local steps of a worker between its reports, or a schedule
      ``own local count -> period``: the first report after ``period(0)`` local steps,
      each next one ``period(n_i)`` local steps after the last.
    pull: strength in (0, 1] of the pull toward the master's leader (the paper's
      lambda-like coupling; default 0.1).
    avg_size: running-mean window of the losses (default ``sync_period``; required
      with a schedule).
    axis_name: the worker axis.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``AsyncLSGDState``; extra
    arguments of ``update``: ``value`` (required), ``active`` (per-worker bool),
    ``any_exchange`` (optional shared bool).

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.async_lsgd(optax.sgd(0.1), sync_period=4, pull=0.1)

  References:
    Teng et al., NeurIPS 2019, arXiv 1905.10395 (asynchronous LSGD).
  """
  base.check_transform("inner", inner)
  period_fn = periodic.require_period("sync_period", sync_period)
  scheduled = callable(sync_period)
  leaders.check_pull("pull", pull)
  if avg_size is None:
    if scheduled:
      raise ValueError("`avg_size` must be given when `sync_period` is a schedule.")
    avg_size = sync_period  # type: ignore[assignment]  # an int: not `scheduled`
  base.check_positive_int("avg_size", avg_size)
  if not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")
  pull = float(pull)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return AsyncLSGDState(
        inner=inner.init(params), losses=jnp.zeros([avg_size], jnp.float32),
        num_losses=zero, local_count=zero, reset=jnp.bool_(False),
        due=period_fn(zero) if scheduled else None,
        shared=AsyncLSGDShared(
            **base.clock(0), num_replacements=zero,
            leader_params=base.tree_copy(params),
            leader=jnp.int32(-1), leader_loss=jnp.float32(jnp.inf),
            pull_distance=jnp.zeros([], jnp.float32)))

  def update_fn(grads, state, params=None, *, active=None, any_exchange=None, **extra):
    if params is None:
      raise TypeError("async_lsgd needs `params`: tx.update(grads, state, params, "
                      "value=loss, active=a).")
    loss = leaders.check_value("async_lsgd", extra.get("value"))
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    sh = state.shared
    act = jnp.bool_(True) if active is None else jnp.asarray(base.unshared(active), jnp.bool_)
    base.refuse_renamed_flags("async_lsgd", extra)
    any_exchange = base.unshared(any_exchange)
    u, new_inner = inner.update(grads, state.inner, params, **extra)
    x = base.tree_where(act, base.tree_add(params, u), params)
    inner_state = base.tree_where(act, new_inner, state.inner)
    losses, num_losses = leaders.push_loss(state.losses, state.num_losses, loss, act)
    run_loss = leaders.running_mean(losses, num_losses)
    local_count = state.local_count + act.astype(jnp.int32)
    if scheduled:
      reports = act & (local_count == state.due)
      due = jnp.where(reports, local_count + period_fn(local_count), state.due)
    else:
      reports = act & (local_count % sync_period == 0)
      due = None
    if any_exchange is None:
      anyone = lax.pmax(reports.astype(jnp.int32), axis_name) > 0
    else:
      anyone = jnp.asarray(any_exchange, jnp.bool_)
    idx = jnp.where(anyone, periodic.EXCHANGE, periodic.NO_EXCHANGE).astype(jnp.int32)

    def report(x):
      """The master elects among this step's reports; a better one replaces ``L``."""
      L_old = base.tree_cast_like(sh.leader_params, params)
      ld, dist = leaders.elect_with_drift(run_loss, x, L_old, axis_name, reports)
      better = ld.ok & (ld.loss < sh.leader_loss)
      L = base.tree_where(better, C.broadcast_from(x, ld.index, axis_name), L_old)
      return dict(num_replacements=sh.num_replacements + better.astype(jnp.int32),
                  leader_params=base.tree_cast_like(L, sh.leader_params),
                  leader=jnp.where(better, ld.index, sh.leader).astype(jnp.int32),
                  leader_loss=jnp.where(better, ld.loss, sh.leader_loss).astype(jnp.float32),
                  pull_distance=jnp.asarray(dist, jnp.float32)), C.tree_is_finite(x)

    def move(x, shared, finite):
      """Reporting workers: ``x_i <- x_i - pull (x_i - L)``."""
      L = base.tree_cast_like(shared.leader_params, x)
      return base.tree_where(reports, L if pull == 1.0 else leaders.pull(x, L, pull), x)

    x_new, new_shared, _, finite = periodic.exchange_step(
        idx, sh, x, report, move=move, warmup_steps=0, axis_name=axis_name)
    L = base.tree_cast_like(new_shared.leader_params, params)
    updates = periodic.updates_to(x_new, params)
    reset = anyone & reports & ~finite
    inner_state = periodic.reset_inner_where(reset, inner, inner_state, L, anyone)
    return updates, AsyncLSGDState(inner_state, losses, num_losses, local_count, new_shared,
                                   reset, due)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@arguments.checked_arguments(where="wagrad.schedules")
def async_report_steps(active: npt.ArrayLike, sync_period: Period
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Which workers report at each step of :func:`async_lsgd` (NumPy, from the schedule).

  Returns ``(reports, any_exchange)``: bool ``[T, K]`` (worker i is active at t and has
  completed a multiple of ``sync_period`` local steps; with a schedule, its due local
  count) and bool ``[T]`` (someone reports at t; pass row t as the shared
  ``any_exchange=``).
  """
  periodic.require_period("sync_period", sync_period)
  a = np.asarray(active, dtype=bool)
  if a.ndim != 2:
    raise ValueError(f"`active` must be a [steps, workers] table, got shape {a.shape}.")
  count = np.cumsum(a, axis=0)  # local steps completed, this one included
  if callable(sync_period):
    reports = periodic.own_clock_table(a, count, sync_period, first_due=None)
  else:
    reports = a & (count % sync_period == 0)
  return reports, reports.any(axis=1)
