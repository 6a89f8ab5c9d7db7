"""Two-level elastic averaging: tree EASGD (multi-leader LSGD:
:mod:`wagrad._src.multi_leader`).

Workers form groups along ``group_axis`` (the workers of one node); the groups meet
along ``global_axis``. On a 2-D mesh ``(nodes, devices)`` or nested vmaps.

* **Tree EASGD** [reconstruction of the topology from the thesis, arXiv 1605.02216]:
  workers are elastic to their group center ``z_g`` every ``tau_low`` steps (rate
  ``alpha_low``); group centers are elastic to the root ``r`` every ``tau_high``
  steps (rate ``alpha_high``); every exchange is simultaneous from the pre-step
  values::

      x_i <- x_i + u_i - alpha_low (x_i - z_g)
      z_g <- z_g + alpha_low sum_{i in g} (x_i - z_g) - alpha_high (z_g - r)
      r   <- r + alpha_high sum_g (z_g - r)

The elastic pieces are those of :mod:`wagrad._src.elastic`.

A non-finite worker is left out of the centers' updates, and is reset at the next
exchange to the shared model (the root) exactly,
through the state's ``reset`` flag and :func:`wagrad.apply_updates`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import periodic
from wagrad._src import elastic
from wagrad._src.base import AxisName, Period

_f32 = base.f32
_tmap = jax.tree_util.tree_map

@base.shared_state
class TreeEASGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  num_root_exchanges: jax.Array  # root-level (group center <-> root) exchanges
  last_root_exchange: jax.Array  # the count right after the last root-level exchange
  target: Any               # = center with a warm-up (assigned exactly at its end), else None
  center: Any               # the root r (the model to evaluate)
  distance: jax.Array       # mean_i ||x_i - z_g(i)||^2 at the last group-level exchange
  root_distance: jax.Array  # mean_g ||z_g - r||^2 at the last root-level exchange

  @property
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.target if self.target is not None else self.center

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return self.center


class TreeEASGDState(NamedTuple):
  inner: Any                # inner optimizer state, per worker
  group_center: Any         # z_g of this worker's group (equal within a group), per worker
  shared: TreeEASGDShared
  reset: Any                # per worker: non-finite at this group-level exchange, so it
                            # takes the root (exactly, through wagrad.apply_updates)


def _pair(name, value, check):
  """``(low, high)``, each passed through ``check(name[level], v)``."""
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise ValueError(f"`{name}` must be a pair (low, high), got {value!r}.")
  return tuple(check(f"{name}[{lvl}]", v) for v, lvl in zip(value, ("low", "high")))


@arguments.checked_arguments
def tree_easgd(inner: optax.GradientTransformation, *, group_axis: AxisName,
               global_axis: AxisName,
               sync_period: tuple[Period, Period] | list[Period] = (1, 4),
               alpha: tuple[float, float] | list[float] | None = None, beta: float = 0.9,
               warmup_steps: int = 0, opt_state_sync: str = "local"
               ) -> optax.GradientTransformationExtraArgs:
  """Two-level (tree) EASGD: workers elastic to their group center, group centers
  elastic to a root. [reconstruction of the thesis' topology]

  With ``u_i = inner(g_i)``, every ``tau_low`` steps (simultaneous, pre-step values)::

      x_i <- x_i + u_i - alpha_low (x_i - z_g)
      z_g <- z_g + alpha_low sum_{i in g} (x_i - z_g)

  and every ``tau_high`` steps ``z_g <- z_g - alpha_high (z_g - r)``,
  ``r <- r + alpha_high sum_g (z_g - r)``; when both happen in one step, ``z_g``
  takes both increments, computed from the pre-step values. The group center is
  per-worker state (identical within a group, computed by collectives over
  ``group_axis``); the root is shared (:func:`easgd_center`). A worker whose
  parameters or local step are non-finite at a group-level exchange is left out of its
  group center's update and reset to the new root, exactly with
  :func:`wagrad.apply_updates` (the state's ``reset`` flag; the group center is
  per-worker state, which it cannot assign), and its inner state restarts. A warm-up runs
  ``warmup_steps`` steps of synchronous all-reduce SGD first; at its end every worker,
  group center and the root take worker 0's parameters (exactly, with
  :func:`wagrad.apply_updates`) and the periods count from there. Use with
  ``wagrad.Runner(backend, K, groups=G)``: ``group_axis=runner.group_axis``,
  ``global_axis=runner.global_axis``.

  Args:
    inner: the local optimizer.
    group_axis: the axis of the workers inside a group (e.g. GPUs of a host).
    global_axis: the axis across groups (e.g. hosts).
    sync_period: ``(tau_low, tau_high)``, each an integer >= 1 or a schedule
      ``step -> period``; with schedules each level exchanges once ``period(step)``
      steps have passed since its own last exchange.
    alpha: ``(alpha_low, alpha_high)`` in (0, 1); default ``(beta / W, beta / G)``
      with W workers per group and G groups.
    beta: in (0, 1], used when ``alpha`` is None.
    warmup_steps: synchronous all-reduce SGD (over every worker) for this many steps
      first.
    opt_state_sync: at each group-level exchange, ``"local"`` keeps every worker's
      inner state, ``"average"`` averages it over the group, ``"reset"`` restarts it.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``TreeEASGDState``.

  Example:
    >>> import optax, wagrad
    >>> r = wagrad.Runner("vmap", 8, groups=2)
    >>> tx = wagrad.tree_easgd(optax.sgd(0.1), group_axis=r.group_axis,
    ...                        global_axis=r.global_axis, sync_period=(2, 8))

  References:
    Zhang, "Distributed stochastic optimization for deep learning", 2016,
    arXiv 1605.02216 (tree EASGD).
  """
  base.check_transform("inner", inner)
  periodic.check_warmup_and_policy(warmup_steps, opt_state_sync)
  low_fn, high_fn = _pair("sync_period", sync_period, periodic.require_period)
  if alpha is not None:
    def check_alpha(n, v):
      base.check_range(n, v, 0.0, 1.0, lo_open=True, hi_open=True)
      return v
    alpha = _pair("alpha", alpha, check_alpha)
  base.check_range("beta", beta, 0.0, 1.0, lo_open=True)
  for name, ax in (("group_axis", group_axis), ("global_axis", global_axis)):
    if not isinstance(ax, (str, tuple)):
      raise TypeError(f"`{name}` must be a string or a tuple of strings, got {ax!r}.")
  all_axes = base.axis_tuple(global_axis) + base.axis_tuple(group_axis)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    p = base.tree_copy(params)
    return TreeEASGDState(inner.init(params), p, TreeEASGDShared(
        **base.clock(0), num_root_exchanges=zero,
        last_root_exchange=zero, target=p if warmup_steps > 0 else None, center=p, distance=jnp.zeros([], jnp.float32),
        root_distance=jnp.zeros([], jnp.float32)), jnp.bool_(False))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("tree_easgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(group_axis)
    base.check_axis_name(global_axis)
    base.check_same_structure("grads", grads, "params", params)
    if alpha is None:
      a_low = elastic.moving_rate(None, beta, group_axis, "alpha[low]")
      a_high = elastic.moving_rate(None, beta, global_axis, "alpha[high]")
    else:
      a_low, a_high = float(alpha[0]), float(alpha[1])
    sh, z = state.shared, state.group_center
    u, inner_state = periodic.local_update(inner, grads, state.inner, params, sh.count,
                                           warmup_steps, all_axes, **extra)
    low = base.is_exchange_step(sh.count, sh.last_exchange, warmup_steps, low_fn)
    high = base.is_exchange_step(sh.count, sh.last_root_exchange, warmup_steps, high_fn)
    warmup_end = (sh.count == warmup_steps - 1) if warmup_steps > 0 else jnp.bool_(False)
    idx = jnp.where(warmup_end, periodic.WARMUP_END, jnp.where(
        low | high, periodic.EXCHANGE, periodic.NO_EXCHANGE)).astype(jnp.int32)
    diff = elastic.elastic_diff(params, u, z)  # x_i - z_g, before the exchange
    # the group level owns the driver's clock; the root level keeps its own
    low_clock = periodic.next_clock((low | warmup_end).astype(jnp.int32), sh, warmup_end)
    root_clock = dict(num_root_exchanges=sh.num_root_exchanges + high.astype(jnp.int32),
                      last_root_exchange=jnp.where(high | warmup_end, sh.count + 1,
                                                   sh.last_root_exchange).astype(jnp.int32))
    with_target = lambda r: dict(center=r, target=r if warmup_steps > 0 else None)  # noqa: E731

    def levels(do_low, do_high):
      """One combination of the two levels, from the pre-step values."""
      def fn(diff):
        finite, z_new, r_new = jnp.bool_(True), _tmap(_f32, z), sh.center
        dist, rdist = sh.distance, sh.root_distance
        if do_low:  # z_g <- z_g + alpha_low sum_{i in g} (x_i - z_g)
          finite, step, dist = elastic.center_exchange(diff, a_low, group_axis,
                                                       dist_axis=all_axes)
          z_new = _tmap(lambda zz, s: zz + s, z_new, step)
        if do_high:  # z_g -= alpha_high (z_g - r); r += alpha_high sum_g (z_g - r)
          use = (lax.axis_index(group_axis) == 0) & C.tree_is_finite(z)  # one per group
          dz = _tmap(lambda zz, rr: _f32(zz) - _f32(rr), z, sh.center)
          tot = C.send(_tmap(lambda d: jnp.where(use, d, jnp.zeros_like(d)), dz),
                       lambda v: lax.psum(v, all_axes))
          n_g = lax.psum(use.astype(jnp.float32), all_axes)
          rdist = lax.psum(jnp.where(use, elastic.sqnorm(dz), 0.0),
                           all_axes) / jnp.maximum(n_g, 1.0)
          z_new = _tmap(lambda zn, d: zn - a_high * d, z_new, dz)
          r_new = _tmap(lambda rr, t: (_f32(rr) + a_high * t).astype(rr.dtype), sh.center, tot)
        changes = dict(**low_clock, **root_clock, **with_target(r_new),
                       distance=jnp.asarray(dist, jnp.float32),
                       root_distance=jnp.asarray(rdist, jnp.float32))
        return changes, (finite, base.tree_cast_like(z_new, z))
      return fn

    def exchange(diff):
      return lax.switch(low.astype(jnp.int32) + 2 * high.astype(jnp.int32) - 1,
                        [levels(True, False), levels(False, True), levels(True, True)], diff)

    def move(x_half, shared, aux):
      """x_i <- x_i + u_i - alpha_low (x_i - z_g) at a group-level exchange; a
      non-finite worker takes the new root."""
      return _tmap(lambda x, d, r: jnp.where(low, jnp.where(
          aux[0], (_f32(x) - a_low * d).astype(x.dtype), r.astype(x.dtype)), x),
          x_half, diff, shared.center)

    x_new, new_shared, _, (finite, z_new) = periodic.exchange_step(
        idx, sh, base.tree_add(params, u), exchange, move=move, operand=diff,
        local_aux=lambda diff: (jnp.bool_(True), z), warmup_steps=warmup_steps,
        axis_name=all_axes, warmup_end=lambda x0: dict(
            **with_target(base.tree_cast_like(x0, sh.center)),
            last_root_exchange=(sh.count + 1).astype(jnp.int32)))
    if warmup_steps > 0:  # every group center takes worker 0's parameters too
      z_new = base.tree_where(idx == periodic.WARMUP_END,
                              base.tree_cast_like(new_shared.center, z), z_new)
    if opt_state_sync != "local":  # at group-level exchanges, over the group
      inner_state = lax.cond(low, lambda s: periodic.sync_opt_state(
          opt_state_sync, inner, s, x_new, group_axis), lambda s: s, inner_state)
    reset = ~finite  # only a group-level exchange finds a worker non-finite
    inner_state = periodic.reset_inner_where(
        reset, inner, inner_state, base.tree_cast_like(new_shared.center, params), low)
    return periodic.updates_to(x_new, params), TreeEASGDState(inner_state, z_new, new_shared,
                                                               reset)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
