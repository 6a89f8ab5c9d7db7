"""Multi-leader LSGD [code] (arXiv 1905.10395, the authors' ``worker_dist_optim.py``): a
local leader per group every ``l_comm`` steps, a global leader every ``g_comm`` steps,
with pulls ``c1``, ``c2`` and proximal terms ``p1``, ``p2`` (:func:`multi_leader_lsgd`),
and the authors' "uneven local steps" rounds (:func:`uneven_round_steps`). The
election and the pull are :mod:`wagrad._src.leaders`'.

Workers form groups along ``group_axis`` (the workers of one node); the groups meet
along ``global_axis``. A non-finite worker is left out of the elections and reset at
the next exchange to the global leader copy exactly (its ``reset`` flag and
:func:`wagrad.apply_updates`).
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
from wagrad._src import leaders
from wagrad._src.base import AxisName, Period

_tmap = jax.tree_util.tree_map


@arguments.checked_arguments(where="wagrad.schedules")
def uneven_round_steps(active: npt.ArrayLike, l_comm: int) -> np.ndarray:
  """The authors' "uneven local steps" rounds as a per-step table (NumPy).

  Their scheduler counts the local steps of *all* workers and starts a blocking round
  once ``K * l_comm`` of them were taken since the last round, so fast workers take
  more local steps per round than slow ones. Given activity masks ``active[t, i]``
  (e.g. :func:`wagrad.schedules.speed_schedule`), returns the bool vector ``[T]`` of global
  steps that end with a round; pass its row to :func:`lsgd` as the shared
  ``any_exchange=`` argument (with ``active=`` the worker's mask).
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
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.global_leader_params

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return evaluate.leader_model(params, self.leader, self.global_leader_params)

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
  reset: Any                        # per worker: non-finite at this round, so it takes
                                    # the global leader copy (wagrad.apply_updates)


def _check_multi_leader_args(inner, group_axis, global_axis, local_period, global_period,
                             warmup_steps, opt_state_sync, local_pull, global_pull,
                             local_proximal, global_proximal, avg_size, num_workers):
  """multi_leader_lsgd's argument checks; returns ``(full_axis, period_fn, global_fn,
  avg_size)``."""
  for name, ax in (("group_axis", group_axis), ("global_axis", global_axis)):
    if not isinstance(ax, (str, tuple)) or (
        isinstance(ax, tuple) and not all(isinstance(a, str) for a in ax)):
      raise TypeError(f"`{name}` must be a string or a tuple of strings, got {ax!r}.")
  full_axis = base.axis_tuple(global_axis) + base.axis_tuple(group_axis)
  periodic.require_period("local_period", local_period)  # named errors for bad periods
  global_fn = periodic.require_period("global_period", global_period)
  period_fn = periodic.check_common(inner, local_period, warmup_steps, opt_state_sync,
                                    full_axis)
  if not (callable(local_period) or callable(global_period)) and global_period % local_period:
    raise ValueError(f"`global_period`={global_period} must be a multiple of "
                     f"`local_period`={local_period}.")
  leaders.check_pull("local_pull", local_pull, allow_zero=True)
  leaders.check_pull("global_pull", global_pull, allow_zero=True)
  leaders.check_proximal("local_proximal", local_proximal)
  leaders.check_proximal("global_proximal", global_proximal)
  avg_size = leaders.check_avg_size(avg_size, local_period, "local_period")
  base.check_positive_int("num_workers", num_workers, allow_none=True)
  return full_axis, period_fn, global_fn, avg_size


def _round_index(sh, warmup_steps, period_fn, global_fn):
  """0: no round, 1: group round, 2: global round, 3: end of the warm-up. A global
  round is the first group round at least ``global_period`` steps after the last one
  (for integer periods, every ``global_period`` steps after the warm-up)."""
  local_ex = base.is_exchange_step(sh.count, sh.last_exchange, warmup_steps, period_fn)
  global_ex = local_ex & base.is_exchange_step(sh.count, sh.last_global_exchange,
                                               warmup_steps, global_fn)
  idx = jnp.where(global_ex, 2, jnp.where(local_ex, 1, 0))
  if warmup_steps > 0:
    idx = jnp.where(sh.count == warmup_steps - 1, 3, idx)
  return idx.astype(jnp.int32)


def _group_election(x, run_loss, Ll_old, state, group_axis, group_start):
  """A group round's election: ``l_g = argmin_{j in g} r_j`` (finite), ``L_g <- x_l``.
  Returns ``(L_g, leader index, its loss, whether x_i is finite, elected)``; a group
  without a finite worker keeps its last leader."""
  finite = C.tree_is_finite(x)
  ld = C.elect_leader(run_loss, group_axis, eligible=finite)
  Ll = base.tree_where(ld.ok, C.broadcast_from(x, ld.index, group_axis), Ll_old)
  return (Ll, jnp.where(ld.ok, group_start + ld.index, state.group_leader),
          jnp.where(ld.ok, ld.loss, state.group_leader_loss), finite, ld.ok)


def _pull_where(ok, x, leader, c):
  """``x_i <- x_i - c (x_i - L)`` where ``ok`` (``c == 1``: ``L`` exactly)."""
  return base.tree_where(ok, leader if c == 1.0 else leaders.pull(x, leader, c), x)


@dataclasses.dataclass(frozen=True)
class _MultiLeader:
  """:func:`multi_leader_lsgd`'s static settings."""
  inner: Any
  group_axis: Any
  full_axis: Any
  c1: float                 # local pull
  c2: float                 # global pull
  use_local: bool           # the group level is on
  opt_state_sync: str
  warmup_steps: int


def _multi_leader_rounds(cfg, rnd, x, inner_state, state, params, run_loss):
  """The round of this step on the periodic skeleton (:func:`periodic.exchange_step`):
  none, local (group leaders), global (group leaders, then the global leader) or the
  warm-up's end, ``rnd`` from :func:`_round_index`. Only the shared state and the
  group leader's copy leave the branch; the workers' pulls and healing are a select
  after it. Returns ``(x, inner_state, group_leader_params, group_leader,
  group_leader_loss, shared, finite)``."""
  sh, inner, full_axis = state.shared, cfg.inner, cfg.full_axis
  Ll_old = base.tree_cast_like(state.group_leader_params, params)
  group_start = lax.axis_index(full_axis) - lax.axis_index(cfg.group_axis)
  mix = sh.mix_weights
  is_global = rnd == 2
  idx = jnp.where(rnd == 3, periodic.WARMUP_END, jnp.where(
      rnd > 0, periodic.EXCHANGE, periodic.NO_EXCHANGE)).astype(jnp.int32)
  global_clock = dict(
      num_global_exchanges=sh.num_global_exchanges + is_global.astype(jnp.int32),
      last_global_exchange=jnp.where(is_global | (rnd == 3), sh.count + 1,
                                     sh.last_global_exchange).astype(jnp.int32))

  def leader_fields(leader):
    return dict(leader=jnp.asarray(leader, jnp.int32),
                mix_weights=None if mix is None else leaders.one_hot(leader, mix.shape[0]))

  def group_round(x):
    if not cfg.use_local:
      return (Ll_old, state.group_leader, state.group_leader_loss, jnp.bool_(True),
              jnp.bool_(False))
    return _group_election(x, run_loss, Ll_old, state, cfg.group_axis, group_start)

  kept = dict(global_leader_params=sh.global_leader_params, leader=sh.leader,
              mix_weights=mix, leader_loss=sh.leader_loss, pull_distance=sh.pull_distance)

  def local_round(x):
    Ll, gi, gl, finite, gok = group_round(x)
    return ({**global_clock, **kept, "exchanged": jnp.bool_(False), "assign": jnp.bool_(False)},
            (Ll, gi, gl, finite, gok))

  def global_round(x):
    Ll, gi, gl, _, gok = group_round(x)
    if cfg.use_local and cfg.c1 > 0:
      x = _pull_where(gok, x, Ll, cfg.c1)
    finite = C.tree_is_finite(x)
    Lg_prev = base.tree_cast_like(sh.global_leader_params, params)  # read here: see lsgd
    ld, dist = leaders.elect_with_drift(run_loss, x, Lg_prev, full_axis)
    Lg = C.broadcast_from(x, ld.index, full_axis)
    elected = dict(global_leader_params=base.tree_cast_like(Lg, sh.global_leader_params),
                   **leader_fields(ld.index), leader_loss=jnp.asarray(ld.loss, jnp.float32),
                   pull_distance=jnp.asarray(dist, jnp.float32))
    changes = base.tree_where(ld.ok, elected, kept)  # no finite worker: none elected
    return ({**global_clock, **changes, "exchanged": ld.ok,
             "assign": ld.ok & (cfg.c2 == 1.0)}, (Ll, gi, gl, finite, gok))

  def exchange(x):
    return lax.cond(is_global, global_round, local_round, x)

  def move(x, shared, aux):
    """The pulls of the round, then a non-finite worker takes the global leader copy."""
    Ll, _, _, finite, gok = aux
    if cfg.use_local and cfg.c1 > 0:
      x = _pull_where(gok, x, Ll, cfg.c1)
    Lg = base.tree_cast_like(shared.global_leader_params, x)
    if cfg.c2 > 0:
      x = _pull_where(is_global & shared.exchanged, x, Lg, cfg.c2)
    return base.tree_where(finite, x, Lg)

  x_new, new_shared, _, (Ll, gi, gl, finite, _) = periodic.exchange_step(
      idx, sh, x, exchange, move=move, warmup_steps=cfg.warmup_steps, axis_name=full_axis,
      local_aux=lambda x: (Ll_old, state.group_leader, state.group_leader_loss,
                           jnp.bool_(True), jnp.bool_(False)),
      warmup_end=lambda x0: dict(
          **global_clock, **leader_fields(0),
          global_leader_params=base.tree_cast_like(x0, sh.global_leader_params),
          pull_distance=jnp.zeros([], jnp.float32)))
  if cfg.warmup_steps > 0:  # every group leader copy is worker 0's parameters too
    Ll = base.tree_where(rnd == 3, x_new, Ll)
    gi = jnp.where(rnd == 3, 0, gi)
  # the inner state: restarted at every round ("reset"), averaged at global rounds
  # ("average"), restarted where a worker was healed
  policy = cfg.opt_state_sync
  if policy != "local":
    when = (rnd == 1) | is_global if policy == "reset" else is_global
    inner_state = lax.cond(when, lambda s: periodic.sync_opt_state(
        policy, inner, s, x_new, full_axis), lambda s: s, inner_state)
  inner_state = periodic.reset_inner_where(~finite, inner, inner_state, x_new,
                                           idx == periodic.EXCHANGE)
  return x_new, inner_state, Ll, gi, gl, new_shared, finite


@arguments.checked_arguments
def multi_leader_lsgd(inner: optax.GradientTransformation, *, group_axis: AxisName,
                      global_axis: AxisName, local_period: Period, global_period: Period,
                      local_pull: float = 0.1, global_pull: float = 0.1,
                      local_proximal: float = 0.1,
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

  A worker whose parameters or local step are non-finite is never elected; at a round
  (a global one only, with the group level off) it takes the global leader copy: the
  new one at a global round, else the last one. It takes it exactly with
  :func:`wagrad.apply_updates` (the state's ``reset`` flag; the group leader copy is
  per-worker state, which it cannot assign), and its inner state restarts.

  Sampling: the paper's workers each sample the whole training set
  (``runner.sample``). With disjoint shards (``runner.shard``) the worker with the
  lowest training loss is the most over-fit one, and it wins the elections.

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
  full_axis, period_fn, global_fn, avg_size = _check_multi_leader_args(
      inner, group_axis, global_axis, local_period, global_period, warmup_steps,
      opt_state_sync, local_pull, global_pull, local_proximal, global_proximal, avg_size,
      num_workers)
  c1, c2, p1, p2 = map(float, (local_pull, global_pull, local_proximal, global_proximal))
  inner = periodic.inner_with_extra_args(inner)
  cfg = _MultiLeader(inner, group_axis, full_axis, c1, c2, c1 > 0 or p1 > 0, opt_state_sync,
                     warmup_steps)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    p = base.tree_copy(params)
    k = base.infer_num_workers(num_workers, full_axis)
    return MultiLeaderState(
        inner=inner.init(params), losses=jnp.zeros([avg_size], jnp.float32),
        num_losses=zero, group_leader_params=p, group_leader=jnp.int32(-1),
        group_leader_loss=jnp.float32(jnp.inf), reset=jnp.bool_(False),
        shared=MultiLeaderShared(
            **base.clock(0),
            num_global_exchanges=zero, last_global_exchange=zero, global_leader_params=p,
            leader=jnp.int32(-1),
            leader_loss=jnp.float32(jnp.inf), mix_weights=leaders.one_hot(-1, k),
            exchanged=jnp.bool_(False), pull_distance=jnp.zeros([], jnp.float32)))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("multi_leader_lsgd needs `params`: tx.update(grads, state, params, "
                      "value=loss).")
    loss = leaders.check_value("multi_leader_lsgd", extra.get("value"))
    base.check_axis_name(full_axis)
    sh = state.shared
    leaders.check_num_workers(sh.mix_weights, full_axis)
    u, inner_state = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, full_axis, **extra)
    x = base.tree_add(params, u)
    losses, num_losses = leaders.push_loss(state.losses, state.num_losses, loss, True)

    # the proximal pulls of every step: p / period (a constant for an integer period)
    after_warmup = sh.count >= warmup_steps
    def per_step(p, period, fn):
      return p / fn(sh.count).astype(jnp.float32) if callable(period) else p / period
    if p2 > 0:
      coef = per_step(p2, global_period, global_fn)
      x = base.tree_where(after_warmup, leaders.pull(
          x, base.tree_cast_like(sh.global_leader_params, params), coef), x)
    if cfg.use_local and p1 > 0:
      coef = per_step(p1, local_period, period_fn)
      x = base.tree_where(after_warmup, leaders.pull(
          x, base.tree_cast_like(state.group_leader_params, params), coef), x)

    idx = _round_index(sh, warmup_steps, period_fn, global_fn)
    x_new, inner_state, Ll, gi, gl, new_shared, finite = _multi_leader_rounds(
        cfg, idx, x, inner_state, state, params, leaders.running_mean(losses, num_losses))
    reset = ~finite  # set only by a round (inside the switch, where it was healed)
    updates = periodic.updates_to(x_new, params)
    return updates, MultiLeaderState(
        inner_state, losses, num_losses,
        base.tree_cast_like(Ll, state.group_leader_params), gi.astype(jnp.int32),
        gl.astype(jnp.float32), new_shared, reset)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
