"""Leader SGD: LSGD, multi-leader LSGD, asynchronous LSGD (and LGD, its full-batch case).

Teng, Gao, Kiernan, Ratner, Li, Sun, Choromanska, "Leader Stochastic Gradient Descent
for Distributed Training of Deep Learning Models", NeurIPS 2019, arXiv 1905.10395.

Objective: ``min sum_i f(x_i) + (lambda/2) ||x_i - x~||^2`` where ``x~`` (the leader) is
the worker with the lowest objective; its stationary points are those of ``f``.

Symbols: ``c`` = ``pull`` (the paper's / the authors' code's c1, c2), ``p`` =
``proximal`` (their p1, p2), ``tau`` = ``sync_period`` (their l_comm / g_comm), ``A`` =
``avg_size``. Every worker keeps ``r_i``, the mean of its last ``A`` minibatch losses
(a ring buffer in the per-worker state). A step of :func:`lsgd` is::

    x_i <- x_i + inner(g_i)                                 (local step)
    x_i <- x_i - (p / tau) (x_i - L)                        (proximal pull, every step)
    every tau steps (an exchange):
      l  = argmin_j r_j      (non-finite r_j never elected; ties -> lowest index)
      L  <- x_l              (the leader's current parameters, broadcast)
      x_i <- x_i - c (x_i - L)

``L`` is the stored copy of the last leader (shared state ``leader_params``, starting at
the initial parameters). With ``c = 1`` the exchange assigns ``L`` exactly (use
:func:`wagrad.apply_updates`).

How sure each rule is (see the design notes):

* [code] (the authors' public code, yunfei-teng/LSGD, ``codes/worker_stoc_optim.py``,
  ``codes/worker_dist_optim.py``): leader = argmin of the running mean of the last
  ``avg_size`` losses (default ``avg_size = l_comm``); losses gathered, only the leader's
  parameters broadcast; the pull ``x <- (1-c1) x + c1 x_local_leader`` every ``l_comm``
  steps and, every ``g_comm / l_comm`` rounds, after it ``x <- (1-c2) x + c2 x_global_leader``
  (using the parameters after the local pull); the proximal pulls
  ``x <- x - (p2/g_comm)(x - L_global)`` then ``x <- x - (p1/l_comm)(x - L_local)`` after
  every local step (also the one that ends a round); defaults c = p = 0.1. Their
  running-mean meter averages a zero-initialised buffer of size ``avg_size``; here the
  mean is over the losses seen so far (the same leader whenever every worker has seen
  equally many losses, as in every synchronous run).
* [code] "uneven local steps": their scheduler starts a (blocking) round after
  ``K * l_comm`` local steps of all workers together. Here that is :func:`lsgd` with
  per-worker activity masks (``active=``) and the round steps given by
  :func:`uneven_round_steps` (``exchange=``); every worker joins the blocking round.
* [reconstruction] :func:`async_lsgd`, the paper's asynchronous LSGD: a master keeps
  the current leader and its loss; every ``tau`` of its *own* local steps a worker
  reports its parameters and running loss; the master's leader is replaced when the
  report's loss is lower; the reporting worker is pulled toward the master's leader.
* [derived] LGD: with full-batch gradients, ``tau = 1``, ``avg_size = 1`` and ``p = 0``,
  :func:`lsgd` is Leader Gradient Descent in the split form (gradient step, then pull
  toward the leader's new iterate).

Communication: lax has no one-to-all broadcast, so "sending only the leader" is a
parameter-sized all-reduce of a one-hot masked tree (the others contribute exact
zeros) plus scalar all-reduces of the running losses (election) -- not an all-gather
of every worker's parameters. Collectives run only in the exchange branch of a
``lax.switch`` on the shared global step (:func:`async_lsgd` additionally decides
"does anyone report" by a scalar ``pmax`` every step unless given the precomputed flag).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import periodic

_NO_EXCHANGE, _EXCHANGE, _WARMUP_END = periodic.NO_EXCHANGE, periodic.EXCHANGE, periodic.WARMUP_END


# ----------------------------------------------------------------------------- helpers


def _acc(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _pull(x, leader, c):
  """``x - c (x - L)`` per leaf, in float32 (or wider); exact for the leader itself."""
  def f(a, l):
    a32 = a.astype(_acc(a.dtype))
    return (a32 - c * (a32 - l.astype(a32.dtype))).astype(a.dtype)
  return jax.tree_util.tree_map(f, x, leader)


def _sq_dist(x, y):
  return sum(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
             for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def _elect_with_drift(run_loss, x, leader_copy, axis_name, taking_part=True):
  """Election at an exchange, and the drift metric from the same collective.

  The drift ``||x_i - L||^2`` to the leader copy ``L`` the workers were pulled toward
  until now is computed before the exchange, so it travels in the election's
  all-gather instead of a collective of its own after the new leader's broadcast. It
  is non-finite iff ``x_i`` is (``L``, an earlier leader, is finite) or it overflows:
  such a worker is neither elected nor counted. ``taking_part``: workers that stand
  and count (the others give NaN). Returns ``(Leader, mean drift)``.
  """
  d = jnp.where(taking_part, _sq_dist(x, leader_copy), jnp.nan)
  return C.elect_leader_and_mean(run_loss, d, axis_name, eligible=jnp.isfinite(d))


def _push_loss(buf, n, loss, active):
  """Write ``loss`` into the ring buffer (when active)."""
  size = buf.shape[0]
  new = buf.at[n % size].set(jnp.asarray(loss, jnp.float32))
  return jnp.where(active, new, buf), n + jnp.asarray(active, jnp.int32)


def _running_mean(buf, n):
  """Mean of the last ``min(n, avg_size)`` losses; +inf (never elected) before any."""
  size = buf.shape[0]
  m = jnp.minimum(n, size)
  s = jnp.sum(jnp.where(jnp.arange(size) < m, buf, 0.0))
  return jnp.where(m > 0, s / jnp.maximum(m, 1).astype(jnp.float32), jnp.inf)


def _one_hot(index, num_workers):
  if num_workers is None:
    return None
  return (jnp.arange(num_workers) == index).astype(jnp.float32)


def _check_num_workers(mix_weights, axis_name):
  if mix_weights is None:
    return
  k = lax.psum(1, axis_name)
  if mix_weights.shape != (k,):
    raise ValueError(
        f"`num_workers`={mix_weights.shape[0]} given at construction but the worker axis "
        f"has {k} workers.")


def _check_value(name, value):
  base.require_value(name, value)
  v = jnp.asarray(value)
  if v.ndim != 0:
    raise TypeError(f"{name}: `value` must be this worker's scalar loss, got shape {v.shape}.")
  return v.astype(jnp.float32)


def _as_tuple(axis):
  return axis if isinstance(axis, tuple) else (axis,)


def _check_pull(name, value, allow_zero=False):
  base.check_range(name, value, 0.0, 1.0, lo_open=not allow_zero)


def _check_proximal(name, value):
  base.check_range(name, value, 0.0, 1.0, hi_open=True)


# ----------------------------------------------------------------------------- LSGD


@base.shared_state
class LSGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  leader_params: Any        # L: copy of the last leader's parameters (also `target`:
                            # assigned exactly when pull == 1)
  leader: jax.Array         # index of the last leader (-1 before the first exchange)
  leader_loss: jax.Array    # its running loss when elected
  mix_weights: Any          # one-hot of the leader (length K), or None if K unknown
  exchanged: jax.Array      # this step exchanged (drives wagrad.sync_model_state)
  pull_distance: jax.Array  # mean_i ||x_i - L_prev||^2 at the last exchange, before it

  @property
  def target(self):
    return self.leader_params


class LSGDState(NamedTuple):
  inner: Any                # local optimizer state (per worker)
  losses: jax.Array         # ring buffer of the last avg_size losses (per worker)
  num_losses: jax.Array     # losses recorded so far (per worker)
  shared: LSGDShared


def lsgd(inner: optax.GradientTransformation, sync_period=4, *, pull: float = 0.1,
         proximal: float = 0.1, avg_size: int | None = None,
         axis_name="workers", warmup_steps: int = 0, opt_state_sync: str = "local",
         num_workers: int | None = None) -> optax.GradientTransformationExtraArgs:
  """Leader SGD: workers are pulled toward the one with the lowest running loss.

  Every step each worker takes a local step and a proximal pull toward the stored
  leader copy ``L``; at the end of every ``sync_period``-th step (after the warm-up)
  the workers elect a leader and pull toward it::

      x_i <- x_i + inner(g_i)
      x_i <- x_i - (proximal / tau) (x_i - L)                  (no communication)
      exchange:  l = argmin_j r_j,   L <- x_l,   x_i <- x_i - pull (x_i - L)

  ``r_j`` is worker j's mean of its last ``avg_size`` minibatch losses (passed as
  ``value=``). A worker whose running loss or parameters are non-finite (or whose
  squared distance to ``L`` overflows float32) is never elected; it is still pulled
  (toward a finite leader). With ``pull=1`` the exchange
  assigns ``L`` exactly through :func:`wagrad.apply_updates`. During the warm-up
  (synchronous SGD) there is no proximal pull; at its end every worker takes worker
  0's parameters and ``L`` is set to them.

  Extra arguments of ``update``: ``value`` (required, this worker's loss),
  ``active`` (optional per-worker bool: an inactive worker skips its local step and
  loss, but joins the blocking exchange as in the authors' code), ``exchange``
  (optional *shared* bool overriding the period: e.g. rows of
  :func:`uneven_round_steps`). Other extra arguments go to ``inner``.

  Args:
    inner: the local optimizer (any optax transform); the authors use SGD with
      Nesterov momentum 0.9 and weight decay 1e-4.
    sync_period: tau >= 1 (the authors' l_comm / g_comm), or a schedule
      ``step -> period``.
    pull: c in (0, 1], strength of the pull at an exchange (default 0.1 [code]).
    proximal: p in [0, 1): the per-step proximal pull is ``p / tau`` (default 0.1
      [code], "on by default" in the newer code); 0 disables it.
    avg_size: A >= 1, the running-mean window of the losses (default ``sync_period``,
      as the authors' script; must be given when ``sync_period`` is a schedule).
    axis_name: the worker axis.
    warmup_steps: synchronous all-reduce SGD for this many steps first.
    opt_state_sync: ``"local"`` (default), ``"average"`` or ``"reset"`` the inner
      optimizer state at exchanges.
    num_workers: K, to size the shared ``mix_weights`` at ``init`` (also inferred
      when ``init`` runs inside the mapped function); without it ``mix_weights`` is
      None and :func:`wagrad.sync_model_state` falls back to a plain mean.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``LSGDState``; the shared
    part holds ``leader``, ``leader_loss``, ``leader_params``, ``mix_weights``
    (one-hot of the leader), ``exchanged``, ``num_exchanges`` and
    ``pull_distance``: at the last exchange, before it, the mean over workers of
    ``||x_i - L||^2`` with ``L`` the previous leader copy (how far the workers
    drifted from the leader they were pulled toward; it rides in the election's
    collective).

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.lsgd(optax.sgd(0.1, momentum=0.9, nesterov=True), sync_period=4,
    ...                  pull=0.1, proximal=0.1, num_workers=8)

  References:
    Teng et al., "Leader Stochastic Gradient Descent for Distributed Training of Deep
    Learning Models", NeurIPS 2019, arXiv 1905.10395.
  """
  period_fn = periodic.check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name)
  _check_pull("pull", pull)
  _check_proximal("proximal", proximal)
  if avg_size is None:
    if callable(sync_period):
      raise ValueError("`avg_size` must be given when `sync_period` is a schedule.")
    avg_size = sync_period
  base.check_positive_int("avg_size", avg_size)
  base.check_positive_int("num_workers", num_workers, allow_none=True)
  pull, proximal = float(pull), float(proximal)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    leader_params = base.tree_copy(params)
    k = base.infer_num_workers(num_workers, axis_name)
    return LSGDState(
        inner=inner.init(params),
        losses=jnp.zeros([avg_size], jnp.float32),
        num_losses=zero,
        shared=LSGDShared(
            **base.clock(0),
            leader_params=leader_params, leader=jnp.int32(-1),
            leader_loss=jnp.float32(jnp.inf), mix_weights=_one_hot(-1, k),
            exchanged=jnp.bool_(False), pull_distance=jnp.zeros([], jnp.float32)))

  def update_fn(grads, state, params=None, *, active=None, exchange=None, **extra):
    if params is None:
      raise TypeError("lsgd needs `params`: tx.update(grads, state, params, value=loss).")
    loss = _check_value("lsgd", extra.get("value"))
    base.check_axis_name(axis_name)
    sh = state.shared
    _check_num_workers(sh.mix_weights, axis_name)
    act = jnp.bool_(True) if active is None else jnp.asarray(active, jnp.bool_)

    u, new_inner = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    if active is None:
      x = base.tree_add(params, u)
      inner_state = new_inner
    else:
      x = base.tree_where(act, base.tree_add(params, u), params)
      inner_state = base.tree_where(act, new_inner, state.inner)
    losses, num_losses = _push_loss(state.losses, state.num_losses, loss, act)
    run_loss = _running_mean(losses, num_losses)

    L_old = base.tree_cast_like(sh.leader_params, params)
    if proximal > 0:
      coef = proximal / period_fn(sh.count).astype(jnp.float32)
      on = act & (sh.count >= warmup_steps)
      x = base.tree_where(on, _pull(x, L_old, coef), x)

    if exchange is None:
      idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)
    else:
      ex = jnp.asarray(exchange, jnp.bool_) & (sh.count >= warmup_steps)
      idx = jnp.where(ex, _EXCHANGE, _NO_EXCHANGE)
      if warmup_steps > 0:
        idx = jnp.where(sh.count == warmup_steps - 1, _WARMUP_END, idx)
      idx = idx.astype(jnp.int32)

    # Only the new shared state (and the inner state when it is synchronised) goes
    # through the branch; the workers' pull towards the new leader is a select after it.
    sync_inner = opt_state_sync != "local"
    carried = inner_state if sync_inner else None
    mix = sh.mix_weights

    def elected(L, leader, assign, **changes):
      return dataclasses.replace(
          sh, **periodic.next_clock(idx, sh, assign), exchanged=jnp.bool_(True),
          leader_params=base.tree_cast_like(L, sh.leader_params),
          leader=jnp.asarray(leader, jnp.int32),
          mix_weights=None if mix is None else _one_hot(leader, mix.shape[0]), **changes)

    def local(x, carried):
      return (dataclasses.replace(sh, **periodic.next_clock(idx, sh, False),
                           exchanged=jnp.bool_(False)), carried)

    def do_exchange(x, carried):
      L_prev = base.tree_cast_like(sh.leader_params, params)
      ld, dist = _elect_with_drift(run_loss, x, L_prev, axis_name)
      L = C.broadcast_from(x, ld.index, axis_name)
      if sync_inner:
        x_new = base.tree_where(ld.ok, L if pull == 1.0 else _pull(x, L, pull), x)
        carried = periodic.sync_opt_state(opt_state_sync, inner, carried, x_new, axis_name)
      new = elected(L, ld.index, pull == 1.0, leader_loss=jnp.asarray(ld.loss, jnp.float32),
                    pull_distance=jnp.asarray(dist, jnp.float32))
      # no finite worker: nothing is elected, the step is a local one
      return base.tree_where(ld.ok, new, local(x, None)[0]), carried

    def warmup_end(x, carried):
      return (elected(periodic.warmup_target(x, axis_name), 0, True,
                      pull_distance=jnp.zeros([], jnp.float32)), carried)

    branches = (local, do_exchange) + ((warmup_end,) if warmup_steps > 0 else ())
    new_shared, carried = lax.switch(idx, branches, x, carried)
    if sync_inner:
      inner_state = carried
    exchanged = new_shared.exchanged
    L = base.tree_cast_like(new_shared.leader_params, params)
    take_L = (idx == _WARMUP_END) | (exchanged & (pull == 1.0))
    if pull == 1.0:
      x_new = base.tree_where(take_L, L, x)
    else:
      x_new = base.tree_where(take_L, L, base.tree_where(exchanged, _pull(x, L, pull), x))
    updates = periodic.updates_to(x_new, params)
    return updates, LSGDState(inner_state, losses, num_losses, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def uneven_round_steps(active, l_comm: int) -> np.ndarray:
  """The authors' "uneven local steps" rounds as a per-step table (NumPy).

  Their scheduler counts the local steps of *all* workers and starts a blocking round
  once ``K * l_comm`` of them were taken since the last round, so fast workers take
  more local steps per round than slow ones. Given activity masks ``active[t, i]``
  (e.g. :func:`wagrad.speed_schedule`), returns the bool vector ``[T]`` of global
  steps that end with a round; pass its row to :func:`lsgd` as the shared
  ``exchange=`` argument (with ``active=`` the worker's mask).
  """
  base.check_positive_int("l_comm", l_comm)
  a = np.asarray(active, dtype=bool)
  if a.ndim != 2:
    raise ValueError(f"`active` must be a [steps, workers] table, got shape {a.shape}.")
  need = a.shape[1] * l_comm
  out = np.zeros(a.shape[0], dtype=bool)
  acc = 0
  for t in range(a.shape[0]):
    acc += int(a[t].sum())
    if acc >= need:
      out[t], acc = True, 0
  return out


# ----------------------------------------------------------------------------- multi-leader


@base.shared_state
class MultiLeaderShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  num_global_exchanges: jax.Array   # global rounds
  last_global_exchange: jax.Array   # the count right after the last global round (or
                                    # the warm-up's end)
  global_leader_params: Any         # copy of the last global leader's parameters (also
                                    # `target`: assigned when global_pull == 1)
  leader: jax.Array                 # index of the last global leader (-1 before any)
  leader_loss: jax.Array
  mix_weights: Any                  # one-hot of the global leader (length K) or None
  exchanged: jax.Array              # a global round (or warm-up end) ran this step
  pull_distance: jax.Array          # mean_i ||x_i - previous global leader||^2 before
                                    # the last global round

  @property
  def target(self):
    return self.global_leader_params


class MultiLeaderState(NamedTuple):
  inner: Any
  losses: jax.Array
  num_losses: jax.Array
  group_leader_params: Any          # copy of this worker's group leader (per worker)
  group_leader: jax.Array           # its worker index (per worker; -1 before any)
  group_leader_loss: jax.Array
  shared: MultiLeaderShared


def multi_leader_lsgd(inner: optax.GradientTransformation, *, group_axis, global_axis,
                      local_period, global_period, local_pull: float = 0.1,
                      global_pull: float = 0.1, local_proximal: float = 0.1,
                      global_proximal: float = 0.1, avg_size: int | None = None,
                      warmup_steps: int = 0, opt_state_sync: str = "local",
                      num_workers: int | None = None) -> optax.GradientTransformationExtraArgs:
  """Multi-leader LSGD: a local leader per group and a global leader [code].

  Workers form groups (e.g. the GPUs of one node). Every step::

      x_i <- x_i + inner(g_i)
      x_i <- x_i - (global_proximal / global_period) (x_i - L_global)
      x_i <- x_i - (local_proximal / local_period) (x_i - L_group(i))
      every local_period steps:  L_group <- leader of the group,
                                 x_i <- x_i - local_pull (x_i - L_group)
      every global_period steps (at a local round), after that:
                                 L_global <- leader of all workers (after the local pull),
                                 x_i <- x_i - global_pull (x_i - L_global)

  Leaders are elected on the running mean of the last ``avg_size`` losses (one
  message serves both elections, as in the authors' code). The group leader copy
  differs between groups and lives in the per-worker state; the global copy is shared.
  ``local_pull = local_proximal = 0`` switches the group level off (the authors' one
  group: only the global pull), which is :func:`lsgd` with
  ``sync_period=global_period``.

  Args:
    inner: the local optimizer.
    group_axis: axis (name or tuple) of the workers inside a group
      (``wagrad.Runner(..., groups=G).group_axis``).
    global_axis: axis across groups (``runner.global_axis``); all workers are
      ``global_axis + group_axis`` (``runner.axis_name``).
    local_period: l_comm >= 1, or a schedule ``step -> period``.
    global_period: g_comm, a multiple of ``local_period``, or a schedule: a global
      round then runs at the first local round at least ``global_period(step)`` steps
      after the last one (the proximal coefficients divide by the current periods).
    local_pull, global_pull: c1, c2 in [0, 1] (default 0.1 [code]).
    local_proximal, global_proximal: p1, p2 in [0, 1) (default 0.1 [code]).
    avg_size: running-mean window (default ``local_period``; required when
      ``local_period`` is a schedule).
    warmup_steps: synchronous SGD (over all workers) for this many steps first.
    opt_state_sync: ``"local"``, ``"average"`` (over all workers, at global rounds)
      or ``"reset"`` (at every round).
    num_workers: K, to size the shared ``mix_weights``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``MultiLeaderState``.

  Example:
    >>> import optax, wagrad
    >>> runner = wagrad.Runner("vmap", 8, groups=2)
    >>> tx = wagrad.multi_leader_lsgd(optax.sgd(0.1), group_axis=runner.group_axis,
    ...     global_axis=runner.global_axis, local_period=4, global_period=16)

  References:
    Teng et al., NeurIPS 2019, arXiv 1905.10395 (multi-leader LSGD).
  """
  for name, ax in (("group_axis", group_axis), ("global_axis", global_axis)):
    if not isinstance(ax, (str, tuple)) or (
        isinstance(ax, tuple) and not all(isinstance(a, str) for a in ax)):
      raise TypeError(f"`{name}` must be a string or a tuple of strings, got {ax!r}.")
  full_axis = _as_tuple(global_axis) + _as_tuple(group_axis)
  periodic.require_period("local_period", local_period)  # named errors for bad periods
  global_fn = periodic.require_period("global_period", global_period)
  period_fn = periodic.check_common(inner, local_period, warmup_steps, opt_state_sync,
                                    full_axis)
  if not (callable(local_period) or callable(global_period)) and global_period % local_period:
    raise ValueError(f"`global_period`={global_period} must be a multiple of "
                     f"`local_period`={local_period}.")
  _check_pull("local_pull", local_pull, allow_zero=True)
  _check_pull("global_pull", global_pull, allow_zero=True)
  _check_proximal("local_proximal", local_proximal)
  _check_proximal("global_proximal", global_proximal)
  if avg_size is None:
    if callable(local_period):
      raise ValueError("`avg_size` must be given when `local_period` is a schedule.")
    avg_size = local_period
  base.check_positive_int("avg_size", avg_size)
  base.check_positive_int("num_workers", num_workers, allow_none=True)
  c1, c2, p1, p2 = map(float, (local_pull, global_pull, local_proximal, global_proximal))
  use_local = c1 > 0 or p1 > 0
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    p = base.tree_copy(params)
    k = base.infer_num_workers(num_workers, full_axis)
    return MultiLeaderState(
        inner=inner.init(params), losses=jnp.zeros([avg_size], jnp.float32),
        num_losses=zero, group_leader_params=p, group_leader=jnp.int32(-1),
        group_leader_loss=jnp.float32(jnp.inf),
        shared=MultiLeaderShared(
            **base.clock(0),
            num_global_exchanges=zero, last_global_exchange=zero, global_leader_params=p,
            leader=jnp.int32(-1),
            leader_loss=jnp.float32(jnp.inf), mix_weights=_one_hot(-1, k),
            exchanged=jnp.bool_(False), pull_distance=jnp.zeros([], jnp.float32)))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("multi_leader_lsgd needs `params`: tx.update(grads, state, params, "
                      "value=loss).")
    loss = _check_value("multi_leader_lsgd", extra.get("value"))
    base.check_axis_name(full_axis)
    sh = state.shared
    _check_num_workers(sh.mix_weights, full_axis)
    u, inner_state = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, full_axis, **extra)
    x = base.tree_add(params, u)
    losses, num_losses = _push_loss(state.losses, state.num_losses, loss, True)
    run_loss = _running_mean(losses, num_losses)

    Lg_old = base.tree_cast_like(sh.global_leader_params, params)
    Ll_old = base.tree_cast_like(state.group_leader_params, params)
    after_warmup = sh.count >= warmup_steps
    def per_step(p, period, fn):  # p / period (a constant for an integer period)
      return p / fn(sh.count).astype(jnp.float32) if callable(period) else p / period
    if p2 > 0:
      coef = per_step(p2, global_period, global_fn)
      x = base.tree_where(after_warmup, _pull(x, Lg_old, coef), x)
    if use_local and p1 > 0:
      coef = per_step(p1, local_period, period_fn)
      x = base.tree_where(after_warmup, _pull(x, Ll_old, coef), x)

    local_ex = base.is_exchange_step(sh.count, sh.last_exchange, warmup_steps, period_fn)
    # a global round: the first local round at least global_period steps after the last
    # one (for integer periods, every global_period steps after the warm-up)
    global_ex = local_ex & base.is_exchange_step(sh.count, sh.last_global_exchange,
                                                 warmup_steps, global_fn)
    idx = jnp.where(global_ex, 2, jnp.where(local_ex, 1, 0))
    if warmup_steps > 0:
      idx = jnp.where(sh.count == warmup_steps - 1, 3, idx)
    idx = idx.astype(jnp.int32)
    me = lax.axis_index(full_axis)
    group_start = me - lax.axis_index(group_axis)

    mix = sh.mix_weights
    n_global = sh.num_global_exchanges + (idx == 2).astype(jnp.int32)
    last_global = jnp.where((idx == 2) | (idx == 3), sh.count + 1,
                            sh.last_global_exchange).astype(jnp.int32)

    def shared_after(assign, exchanged=False, leader=None, **changes):
      if leader is not None:
        changes.update(leader=jnp.asarray(leader, jnp.int32),
                       mix_weights=None if mix is None else _one_hot(leader, mix.shape[0]))
      return dataclasses.replace(sh, **periodic.next_clock(idx, sh, assign),
                          num_global_exchanges=n_global, last_global_exchange=last_global,
                          exchanged=jnp.bool_(exchanged),
                          **changes)

    def group_round(x):
      if not use_local:
        return x, Ll_old, state.group_leader, state.group_leader_loss
      ld = C.elect_leader(run_loss, group_axis, eligible=C.tree_is_finite(x))
      Ll = base.tree_where(ld.ok, C.broadcast_from(x, ld.index, group_axis), Ll_old)
      if c1 > 0:
        x = base.tree_where(ld.ok, Ll if c1 == 1.0 else _pull(x, Ll, c1), x)
      return (x, Ll, jnp.where(ld.ok, group_start + ld.index, state.group_leader),
              jnp.where(ld.ok, ld.loss, state.group_leader_loss))

    def none(x, inner_state):
      return (x, inner_state, Ll_old, state.group_leader, state.group_leader_loss,
              shared_after(False))

    def local_round(x, inner_state):
      x, Ll, gi, gl = group_round(x)
      if opt_state_sync == "reset":
        inner_state = periodic.sync_opt_state("reset", inner, inner_state, x, full_axis)
      return (x, inner_state, Ll, gi, gl, shared_after(False))

    def global_round(x, inner_state):
      x, Ll, gi, gl = group_round(x)
      Lg_prev = base.tree_cast_like(sh.global_leader_params, params)  # read here: see lsgd
      ld, dist = _elect_with_drift(run_loss, x, Lg_prev, full_axis)
      Lg = C.broadcast_from(x, ld.index, full_axis)
      if c2 > 0:
        x = base.tree_where(ld.ok, Lg if c2 == 1.0 else _pull(x, Lg, c2), x)
      inner_state = periodic.sync_opt_state(opt_state_sync, inner, inner_state, x, full_axis)
      elected = shared_after(
          c2 == 1.0, True, ld.index,
          global_leader_params=base.tree_cast_like(Lg, sh.global_leader_params),
          leader_loss=jnp.asarray(ld.loss, jnp.float32),
          pull_distance=jnp.asarray(dist, jnp.float32))
      # no finite worker: nothing is elected
      return (x, inner_state, Ll, gi, gl,
              base.tree_where(ld.ok, elected, shared_after(False)))

    def warmup_end(x, inner_state):
      t = base.tree_cast_like(periodic.warmup_target(x, full_axis), params)
      return (t, inner_state, t, jnp.int32(0), state.group_leader_loss,
              shared_after(True, True, 0,
                           global_leader_params=base.tree_cast_like(t, sh.global_leader_params),
                           pull_distance=jnp.zeros([], jnp.float32)))

    branches = (none, local_round, global_round) + ((warmup_end,) if warmup_steps > 0 else ())
    x_new, inner_state, Ll, gi, gl, new_shared = lax.switch(
        idx, branches, x, inner_state)
    updates = periodic.updates_to(x_new, params)
    return updates, MultiLeaderState(
        inner_state, losses, num_losses,
        base.tree_cast_like(Ll, state.group_leader_params), gi.astype(jnp.int32),
        gl.astype(jnp.float32), new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- async LSGD


@base.shared_state
class AsyncLSGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  num_replacements: jax.Array # times the master's leader was replaced
  target: Any                 # None: pulls are per worker, nothing is assigned
  leader_params: Any          # the master's leader
  leader: jax.Array           # worker that sent it (-1: the initial parameters)
  leader_loss: jax.Array      # its running loss when it was sent (+inf initially)
  pull_distance: jax.Array    # mean over reporting workers of ||x_i - leader||^2,
                              # the master's leader before their report


class AsyncLSGDState(NamedTuple):
  inner: Any
  losses: jax.Array
  num_losses: jax.Array
  local_count: jax.Array      # this worker's own local steps (its clock)
  shared: AsyncLSGDShared
  due: Any = None             # with a period schedule: the local count of the next report


def async_lsgd(inner: optax.GradientTransformation, sync_period=4, *,
               pull: float = 0.1, avg_size: int | None = None, axis_name="workers"
               ) -> optax.GradientTransformationExtraArgs:
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
  the precomputed shared flag (``any_report=``, a row of :func:`async_report_steps`)
  to avoid even that. Inactive workers keep their state unchanged and are neither
  elected nor pulled. This rule is reconstructed from the paper's description (its
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
    ``any_report`` (optional shared bool).

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.async_lsgd(optax.sgd(0.1), sync_period=4, pull=0.1)

  References:
    Teng et al., NeurIPS 2019, arXiv 1905.10395 (asynchronous LSGD).
  """
  base.check_transform("inner", inner)
  period_fn = periodic.require_period("sync_period", sync_period)
  scheduled = callable(sync_period)
  _check_pull("pull", pull)
  if avg_size is None:
    if scheduled:
      raise ValueError("`avg_size` must be given when `sync_period` is a schedule.")
    avg_size = sync_period
  base.check_positive_int("avg_size", avg_size)
  if not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")
  pull = float(pull)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return AsyncLSGDState(
        inner=inner.init(params), losses=jnp.zeros([avg_size], jnp.float32),
        num_losses=zero, local_count=zero,
        due=period_fn(zero) if scheduled else None,
        shared=AsyncLSGDShared(
            **base.clock(0), num_replacements=zero,
            target=None, leader_params=base.tree_copy(params),
            leader=jnp.int32(-1), leader_loss=jnp.float32(jnp.inf),
            pull_distance=jnp.zeros([], jnp.float32)))

  def update_fn(grads, state, params=None, *, active=None, any_report=None, **extra):
    if params is None:
      raise TypeError("async_lsgd needs `params`: tx.update(grads, state, params, "
                      "value=loss, active=a).")
    loss = _check_value("async_lsgd", extra.get("value"))
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    sh = state.shared
    act = jnp.bool_(True) if active is None else jnp.asarray(active, jnp.bool_)
    u, new_inner = inner.update(grads, state.inner, params, **extra)
    x = base.tree_where(act, base.tree_add(params, u), params)
    inner_state = base.tree_where(act, new_inner, state.inner)
    losses, num_losses = _push_loss(state.losses, state.num_losses, loss, act)
    run_loss = _running_mean(losses, num_losses)
    local_count = state.local_count + act.astype(jnp.int32)
    if scheduled:
      reports = act & (local_count == state.due)
      due = jnp.where(reports, local_count + period_fn(local_count), state.due)
    else:
      reports = act & (local_count % sync_period == 0)
      due = None
    if any_report is None:
      anyone = lax.pmax(reports.astype(jnp.int32), axis_name) > 0
    else:
      anyone = jnp.asarray(any_report, jnp.bool_)
    clock = periodic.next_clock(anyone.astype(jnp.int32), sh, False)

    # Only the shared state goes through the branch; the reporting workers' pull is a
    # select after it.
    def quiet(x):
      return dataclasses.replace(sh, **clock)

    def report(x):
      L_old = base.tree_cast_like(sh.leader_params, params)
      ld, dist = _elect_with_drift(run_loss, x, L_old, axis_name, reports)
      better = ld.ok & (ld.loss < sh.leader_loss)
      L = base.tree_where(better, C.broadcast_from(x, ld.index, axis_name), L_old)
      return dataclasses.replace(
          sh, **clock, num_replacements=sh.num_replacements + better.astype(jnp.int32),
          leader_params=base.tree_cast_like(L, sh.leader_params),
          leader=jnp.where(better, ld.index, sh.leader).astype(jnp.int32),
          leader_loss=jnp.where(better, ld.loss, sh.leader_loss).astype(jnp.float32),
          pull_distance=jnp.asarray(dist, jnp.float32))

    new_shared = lax.cond(anyone, report, quiet, x)
    L = base.tree_cast_like(new_shared.leader_params, params)
    x_new = base.tree_where(anyone & reports, L if pull == 1.0 else _pull(x, L, pull), x)
    updates = periodic.updates_to(x_new, params)
    return updates, AsyncLSGDState(inner_state, losses, num_losses, local_count, new_shared,
                                   due)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def async_report_steps(active, sync_period):
  """Which workers report at each step of :func:`async_lsgd` (NumPy, from the schedule).

  Returns ``(reports, any_report)``: bool ``[T, K]`` (worker i is active at t and has
  completed a multiple of ``sync_period`` local steps; with a schedule, its due local
  count) and bool ``[T]`` (someone reports at t; pass row t as the shared
  ``any_report=``).
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
