"""Elastic averaging SGD: EASGD, EAMSGD, asynchronous and tree EASGD; DOWNPOUR.

Objective (Zhang, Choromanska, LeCun, arXiv 1412.6651): ``min sum_i f(x_i) +
(rho/2) ||x_i - x~||^2`` with a center variable ``x~``; ``alpha = eta * rho`` is the
moving rate and ``beta = p * alpha`` (p workers). Symbols: ``alpha``, ``beta``,
``tau`` (``sync_period``), ``delta`` (``momentum``), ``eta`` (``learning_rate``).

* **Synchronous EASGD** [code] (eq. 5-6 of the paper): on an exchange step, from the
  pre-step values ``x_i`` and ``x~`` and the local step ``u_i = inner(g_i(x_i))``::

      x_i <- x_i + u_i - alpha (x_i - x~)
      x~  <- x~ + alpha sum_i (x_i - x~)  =  (1 - beta) x~ + beta mean_i x_i

  and plain local steps ``x_i <- x_i + u_i`` in between. Default ``beta = 0.9``,
  ``alpha = beta / p`` [code].
* **EAMSGD** [code] (Algorithm 2): the local step is Nesterov momentum with the gradient
  at the look-ahead point of the pre-elastic ``x_i``::

      v_i <- delta v_i - eta g_i(x_i + delta v_i)
      x_i <- x_i + v_i - alpha (x_i - x~)        (exchange steps; x~ as above)

  The user's loop evaluates the gradient at :func:`eamsgd_lookahead`.
* **Asynchronous EASGD** [code] (Algorithm 1): worker i with its own clock ``t_i``
  exchanges at an active step when ``t_i mod tau == 0`` (also at ``t_i = 0``)::

      e = alpha (x_i - x~);  x~ <- x~ + e;  x_i <- x_i - eta g_i(x_i) - e

  Simulated with seeded activity masks (:mod:`wagrad._src.schedules`). Several
  workers exchanging in one global step reach the master in ascending worker order,
  each seeing the center left by the previous one (``order="sequential"``, the
  closed form ``x~_m = (1-alpha)^m x~ + sum_k alpha (1-alpha)^(m-1-r_k) x_k``), or all
  see the same center (``order="simultaneous"``). The ordering of simultaneous
  arrivals is a simulation choice, not the paper's.
* **Tree EASGD** [reconstruction of the topology from the thesis, arXiv 1605.02216]:
  workers are elastic to their group center ``z_g`` every ``tau_low`` steps (rate
  ``alpha_low``); group centers are elastic to the root ``r`` every ``tau_high``
  steps (rate ``alpha_high``); every exchange is simultaneous from the pre-step
  values::

      x_i <- x_i + u_i - alpha_low (x_i - z_g)
      z_g <- z_g + alpha_low sum_{i in g} (x_i - z_g) - alpha_high (z_g - r)
      r   <- r + alpha_high sum_g (z_g - r)

* **DOWNPOUR** [code: the EASGD authors' baseline]: the worker accumulates its updates
  over tau local steps; the master adds every worker's accumulated update to its
  parameters and the workers receive the master's parameters (exact assignment).
  Simulated synchronously (all workers push in the same step). MDOWNPOUR, momentum on
  the master's update (``master_momentum``), is a [reconstruction].

The model the paper evaluates is the center: :func:`easgd_center` returns it
(``state.shared.center``; the root for tree EASGD, the master for DOWNPOUR).

Model state (BatchNorm statistics): :func:`wagrad.sync_model_state` averages it on
DOWNPOUR's exchanges (they assign) and at the end of EASGD's warm-up; elastic
exchanges leave it local (the elastic rule has no meaning for running statistics):
re-estimate the center's statistics on training data before evaluating it.

Non-finite workers: a worker whose parameters or local step are non-finite (or whose
squared distance to the center overflows float32) is left out of the center's update
(its contribution is zero) and is reset to the new center at the exchange (through an
additive update; a worker whose *parameters* are already non-finite cannot be repaired
by an additive update and stays non-finite).

References:
  Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
  arXiv 1412.6651. Zhang, "Distributed stochastic optimization for deep learning"
  (thesis), arXiv 1605.02216. Dean et al., "Large Scale Distributed Deep Networks",
  NeurIPS 2012 (DOWNPOUR).
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

ORDERS = ("sequential", "simultaneous")


# ----------------------------------------------------------------------------- helpers


def _f32(x):
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def _tmap(f, *trees):
  return jax.tree_util.tree_map(f, *trees)


def _sqnorm(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return sum(jnp.sum(jnp.square(_f32(x))) for x in leaves).astype(jnp.float32)


def _check_alpha_beta(alpha, beta):
  if alpha is not None:
    base.check_range("alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=True)
  base.check_range("beta", beta, 0.0, 1.0, lo_open=True)


def _moving_rate(alpha, beta, axis_name, what="alpha"):
  """alpha, or beta / p with p the number of workers along ``axis_name`` (trace time)."""
  if alpha is not None:
    return float(alpha)
  p = lax.psum(1, axis_name)
  a = float(beta) / int(p)
  if not 0.0 < a < 1.0:
    raise ValueError(f"`{what}` = beta / p = {beta} / {p} = {a} must be in (0, 1): "
                     f"pass `{what}` explicitly or a smaller `beta`.")
  return a


def _axes_tuple(axis):
  return axis if isinstance(axis, tuple) else (axis,)


def _elastic_diff(params, u, center):
  """``x - c`` per leaf in float32, plus ``0 u``: the same values where ``u`` is finite,
  non-finite where it is not, so the exchange's one finiteness test covers the local
  step too (:func:`_center_exchange`)."""
  return _tmap(lambda x, c, uu: _f32(x) - _f32(c) + 0.0 * _f32(uu), params, center, u)


def _center_exchange(diff, a, axis_name, dist_axis=None):
  """The center's side of EASGD's elastic exchange (eq. 5-6) from ``diff`` =
  :func:`_elastic_diff`.

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


def _elastic_update(u, diff, a, params):
  """The worker's side of the exchange: ``u - a (x - c)`` in the params' dtypes."""
  return _tmap(lambda uu, d, x: (_f32(uu) - a * d).astype(x.dtype), u, diff, params)


def _elastic_exchange(params, u, center, a, axis_name, dist_axis=None):
  """Simultaneous elastic exchange of EASGD (eq. 5-6) from the pre-step values, inside
  a branch.

  Returns ``(updates, finite, center_step, distance)``: the worker's update
  ``u - a (x - c)`` (a non-finite worker is reset by :func:`_reset_nonfinite` once
  the new center is known) and :func:`_center_exchange`'s three.
  """
  diff = _elastic_diff(params, u, center)
  finite, step, dist = _center_exchange(diff, a, axis_name, dist_axis)
  return _elastic_update(u, diff, a, params), finite, step, dist


def _reset_nonfinite(upd, finite, new_center, params):
  """A non-finite worker moves to the new center (the update ``c_new - x``)."""
  return _tmap(lambda v, c, x: jnp.where(finite, v, (c.astype(x.dtype) - x)),
               upd, new_center, params)


def _worker_moves(u, params, diff, c_new, a, exchanged, to_center):
  """The workers' side of an exchange, as a select after the branch: the elastic step
  ``u - a diff`` (``diff`` from :func:`_elastic_diff`) on exchange steps,
  ``c_new - x`` where ``to_center`` (a non-finite worker, the warm-up's end), ``u``
  otherwise."""
  def move(uu, x, d, c1):
    elastic = (_f32(uu) - a * d).astype(x.dtype)
    return jnp.where(to_center, c1.astype(x.dtype) - x,
                     jnp.where(exchanged, elastic, uu)).astype(uu.dtype)
  return _tmap(move, u, params, diff, c_new)


def easgd_center(opt_state):
  """The center variable the paper evaluates (shared, identical on every worker).

  Works for the states of :func:`easgd`, :func:`eamsgd`, :func:`async_easgd`,
  :func:`tree_easgd` (the root) and :func:`downpour` (the master's parameters), also
  when nested in an ``optax.chain`` state. Outside a mapped function, on a runner's
  state, it returns the unstacked center.
  """
  sh = base.find_shared(opt_state, "center")
  if sh is None:
    raise TypeError("`opt_state` holds no EASGD-family state (no shared `center`).")
  return sh.center


# ----------------------------------------------------------------------------- EASGD


@base.shared_state
class EASGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # = center with a warm-up (assigned exactly at its end), else None
  center: Any               # the center variable x~
  distance: jax.Array       # mean_i ||x_i - x~||^2 (finite workers) at the last exchange
  outer: Any                # outer optimizer state (or None)


class EASGDState(NamedTuple):
  inner: Any
  shared: EASGDShared


def easgd(inner: optax.GradientTransformation, sync_period=1, *, alpha: float | None = None,
          beta: float = 0.9, axis_name="workers", warmup_steps: int = 0,
          opt_state_sync: str = "local",
          outer_optimizer: optax.GradientTransformation | None = None
          ) -> optax.GradientTransformationExtraArgs:
  """Synchronous elastic averaging SGD (EASGD).

  Every step each worker takes a local step ``u_i = inner(g_i)``. At the end of every
  ``sync_period``-th step (after the warm-up) the workers and the center exchange,
  simultaneously from the pre-step values::

      x_i <- x_i + u_i - alpha (x_i - x~)
      x~  <- x~ + alpha sum_i (x_i - x~)

  otherwise ``x_i <- x_i + u_i``. The center starts at the initial parameters. A
  non-finite worker is left out of the center's update and reset to the new center.
  With ``outer_optimizer`` the center moves by ``outer(-alpha sum_i (x_i - x~))``
  (``optax.sgd(1.0)`` is plain EASGD). The paper evaluates the center:
  :func:`easgd_center` (``state.shared.center``).

  Args:
    inner: the local optimizer (any optax transform; ``optax.sgd(eta)`` is the paper's).
    sync_period: tau >= 1 or a schedule ``step -> period``.
    alpha: moving rate in (0, 1); default ``beta / p`` (p workers, at trace time).
    beta: ``p * alpha`` in (0, 1] when ``alpha`` is None; default 0.9 [code].
    axis_name: the worker axis.
    warmup_steps: synchronous all-reduce SGD for this many steps first; at its end
      the workers and the center take worker 0's parameters (exactly, with
      :func:`wagrad.apply_updates`).
    opt_state_sync: ``"local"``, ``"average"`` or ``"reset"`` the inner state at
      exchanges.
    outer_optimizer: optional optax transform applied to the center's pseudo-gradient.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``EASGDState``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.easgd(optax.sgd(0.1), sync_period=4, beta=0.9)

  References:
    Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", 2015,
    arXiv 1412.6651, eq. (5)-(6).
  """
  period_fn = periodic.check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name)
  _check_alpha_beta(alpha, beta)
  if outer_optimizer is not None:
    base.check_transform("outer_optimizer", outer_optimizer)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    center = base.tree_copy(params)
    return EASGDState(inner.init(params), EASGDShared(
        **base.clock(0),
        target=center if warmup_steps > 0 else None, center=center,
        distance=jnp.zeros([], jnp.float32),
        outer=None if outer_optimizer is None else outer_optimizer.init(params)))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("easgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    a = _moving_rate(alpha, beta, axis_name)
    sh = state.shared
    u, inner_state = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)

    # Only the new shared state (and the inner state when it is synchronised) goes
    # through the branch. The workers' elastic step is a select after it, from the
    # difference to the old center taken before it.
    sync_inner = opt_state_sync != "local"
    carried = inner_state if sync_inner else None
    clock = periodic.next_clock(idx, sh)

    def with_center(center, **changes):
      return dataclasses.replace(sh, **clock, center=center,
                          target=center if warmup_steps > 0 else None, **changes)

    diff = _elastic_diff(params, u, sh.center)

    def local(diff, carried):
      return dataclasses.replace(sh, **clock), jnp.bool_(True), carried

    def exchange(diff, carried):
      c_old = sh.center
      finite, step, dist = _center_exchange(diff, a, axis_name)
      if outer_optimizer is None:
        center = _tmap(lambda c, s: (_f32(c) + s).astype(c.dtype), c_old, step)
        outer_state = sh.outer
      else:
        pseudo = _tmap(lambda s, c: (-s).astype(c.dtype), step, c_old)
        ou, outer_state = outer_optimizer.update(pseudo, sh.outer, c_old)
        center = optax.apply_updates(c_old, ou)
      if sync_inner:
        upd = _reset_nonfinite(_elastic_update(u, diff, a, params), finite, center, params)
        carried = periodic.sync_opt_state(opt_state_sync, inner, carried,
                                          base.tree_add(params, upd), axis_name)
      return (with_center(center, distance=jnp.asarray(dist, jnp.float32), outer=outer_state),
              finite, carried)

    def warmup_end(diff, carried):
      t = base.tree_cast_like(periodic.warmup_target(base.tree_add(params, u), axis_name),
                              sh.center)
      return with_center(t, distance=jnp.zeros([], jnp.float32)), jnp.bool_(True), carried

    branches = (local, exchange) + ((warmup_end,) if warmup_steps > 0 else ())
    new_shared, finite, carried = lax.switch(idx, branches, diff, carried)
    if sync_inner:
      inner_state = carried
    exchanged = idx == periodic.EXCHANGE
    to_center = (idx == periodic.WARMUP_END) | (exchanged & ~finite)

    upd = _worker_moves(u, params, diff, new_shared.center, a, exchanged, to_center)
    return upd, EASGDState(inner_state, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- EAMSGD


@base.shared_state
class EAMSGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # always None (EAMSGD never assigns)
  center: Any               # the center variable x~
  distance: jax.Array       # mean_i ||x_i - x~||^2 (finite workers) at the last exchange
  momentum: jax.Array       # delta (constant; read by eamsgd_lookahead)


class EAMSGDState(NamedTuple):
  velocity: Any             # v_i, per worker
  shared: EAMSGDShared


def eamsgd(learning_rate, sync_period=1, *, momentum: float = 0.99,
           alpha: float | None = None, beta: float = 0.9, axis_name="workers"
           ) -> optax.GradientTransformationExtraArgs:
  """Elastic averaging momentum SGD (EAMSGD), synchronous.

  The gradient passed to ``update`` must be taken at the look-ahead point
  ``x_i + delta v_i`` returned by :func:`eamsgd_lookahead` (optax's Nesterov cannot
  express it). Every step::

      v_i <- delta v_i - eta g_i(x_i + delta v_i)
      x_i <- x_i + v_i                              (local steps)
      x_i <- x_i + v_i - alpha (x_i - x~)           (exchange steps, every tau)
      x~  <- x~ + alpha sum_i (x_i - x~)            (exchange steps)

  the elastic terms from the pre-step ``x_i`` and ``x~``. ``momentum=0`` is
  :func:`easgd` with ``optax.sgd(learning_rate)``.

  Args:
    learning_rate: eta > 0, or an optax schedule of the global step.
    sync_period: tau >= 1 or a schedule ``step -> period``.
    momentum: delta in [0, 1); the authors' launch script uses 0.99 with eta = 0.01.
    alpha: moving rate in (0, 1); default ``beta / p``.
    beta: in (0, 1], used when ``alpha`` is None.
    axis_name: the worker axis.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``EAMSGDState``.

  Example:
    >>> import wagrad
    >>> tx = wagrad.eamsgd(0.01, sync_period=10, momentum=0.99)
    >>> # in the step: x_look = wagrad.eamsgd_lookahead(params, state)
    >>> #              grads = jax.grad(loss)(x_look, batch)

  References:
    Zhang, Choromanska, LeCun, 2015, arXiv 1412.6651, Algorithm 2.
  """
  if callable(learning_rate):
    lr_fn = learning_rate
  else:
    base.check_range("learning_rate", learning_rate, 0.0, np.inf, lo_open=True)
    lr_fn = lambda count: learning_rate  # noqa: E731
  base.check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
  _check_alpha_beta(alpha, beta)
  if not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")
  period_fn = base.make_period_fn("sync_period", sync_period)
  delta = float(momentum)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return EAMSGDState(_tmap(jnp.zeros_like, params), EAMSGDShared(
        **base.clock(0), target=None,
        center=base.tree_copy(params), distance=jnp.zeros([], jnp.float32),
        momentum=jnp.float32(delta)))

  def update_fn(grads, state, params=None, **extra):
    del extra
    if params is None:
      raise TypeError("eamsgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    a = _moving_rate(alpha, beta, axis_name)
    sh = state.shared
    eta = jnp.asarray(lr_fn(sh.count), jnp.float32)
    v = _tmap(lambda v, g: (delta * _f32(v) - eta * _f32(g)).astype(v.dtype),
              state.velocity, grads)
    ex = base.is_exchange_step(sh.count, sh.last_exchange, 0, period_fn)
    clock = periodic.next_clock(ex.astype(jnp.int32), sh, False)

    # Only the shared state and each worker's finiteness go through the branch;
    # the workers' elastic step is a select after it (as in easgd).
    diff = _elastic_diff(params, v, sh.center)

    def local(diff):
      return dataclasses.replace(sh, **clock), jnp.bool_(True)

    def exchange(diff):
      finite, step, dist = _center_exchange(diff, a, axis_name)
      center = _tmap(lambda c, s: (_f32(c) + s).astype(c.dtype), sh.center, step)
      return (dataclasses.replace(sh, **clock, center=center,
                           distance=jnp.asarray(dist, jnp.float32)), finite)

    new_shared, finite = lax.cond(ex, exchange, local, diff)
    to_center = ex & ~finite
    upd = _worker_moves(v, params, diff, new_shared.center, a, ex, to_center)
    v = _tmap(lambda vv: jnp.where(to_center, jnp.zeros_like(vv), vv), v)
    return upd, EAMSGDState(v, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def eamsgd_lookahead(params, opt_state):
  """The point ``x_i + delta v_i`` at which EAMSGD's gradient must be evaluated.

  Call it in the per-worker step before computing the gradient::

      x_look = wagrad.eamsgd_lookahead(params, state)
      loss, grads = jax.value_and_grad(loss_fn)(x_look, batch)
      updates, state = tx.update(grads, state, params)

  ``opt_state`` is an ``EAMSGDState`` or a state containing one (e.g. an
  ``optax.chain`` state).
  """
  found = [n for n in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda n: isinstance(n, EAMSGDState)) if isinstance(n, EAMSGDState)]
  if not found:
    raise TypeError("`opt_state` holds no EAMSGDState.")
  st = found[0]
  delta = st.shared.momentum
  return _tmap(lambda x, v: (_f32(x) + delta * _f32(v)).astype(x.dtype), params, st.velocity)




# ----------------------------------------------------------------------------- async EASGD


def async_easgd_schedule(active, sync_period):
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


class AsyncEASGDState(NamedTuple):
  inner: Any                # inner optimizer state, per worker
  clock: jax.Array          # t_i: this worker's own active steps, per worker
  shared: AsyncEASGDShared
  due: Any = None           # with a period schedule: the clock of the next exchange


def async_easgd(inner: optax.GradientTransformation, sync_period=1, *,
                alpha: float | None = None, beta: float = 0.9, axis_name="workers",
                order: str = "sequential") -> optax.GradientTransformationExtraArgs:
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
  updates and keeps its inner state and clock.

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
  _check_alpha_beta(alpha, beta)
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
        num_exchanging=zero), due=zero if scheduled else None)

  def update_fn(grads, state, params=None, *, active=True, any_exchange=None, **extra):
    if params is None:
      raise TypeError("async_easgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    a = _moving_rate(alpha, beta, axis_name)
    sh = state.shared
    act = jnp.asarray(active, jnp.bool_)
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
      return u, shared_after(jnp.zeros([], jnp.int32))

    def exchange(u):
      finite = C.tree_is_finite(params) & C.tree_is_finite(u)
      ex = me & finite
      ex_all = C.all_gather(ex, axis_name)                       # [K], shared
      rank_all = jnp.cumsum(ex_all.astype(jnp.int32)) - ex_all.astype(jnp.int32)
      m = jnp.sum(ex_all.astype(jnp.int32))
      n_me = jnp.sum(C.all_gather(me, axis_name).astype(jnp.int32))
      idx = lax.axis_index(axis_name)
      r = rank_all[idx]
      c = sh.center
      one_m = jnp.float32(1.0 - a)
      if order == "simultaneous":
        seen = _tmap(_f32, c)
        step = C.send(_tmap(lambda x, cc: jnp.where(ex, a * (_f32(x) - _f32(cc)),
                                                     jnp.zeros_like(_f32(x))), params, c),
                       lambda v: lax.psum(v, axis_name))
        new_c = _tmap(lambda cc, s: (_f32(cc) + s).astype(cc.dtype), c, step)
      else:
        xs = C.all_gather(_tmap(lambda x: jnp.where(ex, _f32(x), jnp.zeros_like(_f32(x))),
                                params), axis_name)              # [K, ...], shared
        rf = rank_all.astype(jnp.float32)
        # center seen by this worker: c_r = (1-a)^r c + sum_{rank_k < r} a (1-a)^(r-1-rank_k) x_k
        w_seen = jnp.where(ex_all & (rank_all < r),
                           a * jnp.power(one_m, r.astype(jnp.float32) - 1.0 - rf), 0.0)
        # center after all m exchanges: (1-a)^m c + sum_k a (1-a)^(m-1-rank_k) x_k
        w_end = jnp.where(ex_all, a * jnp.power(one_m, m.astype(jnp.float32) - 1.0 - rf), 0.0)

        def comb(w, scale, cc, x):
          return scale * _f32(cc) + jnp.tensordot(w, x, axes=1)

        seen = _tmap(lambda cc, x: comb(w_seen, jnp.power(one_m, r.astype(jnp.float32)), cc, x),
                     c, xs)
        new_c = _tmap(lambda cc, x: comb(w_end, jnp.power(one_m, m.astype(jnp.float32)), cc,
                                         x).astype(cc.dtype), c, xs)
      diff = _tmap(lambda x, s: _f32(x) - s, params, seen)
      upd = _tmap(lambda uu, d, x: jnp.where(ex, _f32(uu) - a * d, _f32(uu)).astype(x.dtype),
                  u, diff, params)
      # a non-finite exchanging worker is left out of the master and reset to it
      upd = _tmap(lambda v, cc, x: jnp.where(me & ~finite, cc.astype(x.dtype) - x, v),
                  upd, new_c, params)
      dist = lax.psum(jnp.where(ex, _sqnorm(diff), 0.0), axis_name) / jnp.maximum(
          m.astype(jnp.float32), 1.0)
      return upd, shared_after(n_me, center=new_c, distance=jnp.asarray(dist, jnp.float32))

    upd, new_shared = lax.cond(pred, exchange, local, u)
    clock = state.clock + act.astype(jnp.int32)
    return upd, AsyncEASGDState(inner_state, clock, new_shared, due)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- tree EASGD


@base.shared_state
class TreeEASGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  num_root_exchanges: jax.Array  # root-level (group center <-> root) exchanges
  last_root_exchange: jax.Array  # the count right after the last root-level exchange
  target: Any               # always None
  center: Any               # the root r (the model to evaluate)
  distance: jax.Array       # mean_i ||x_i - z_g(i)||^2 at the last group-level exchange
  root_distance: jax.Array  # mean_g ||z_g - r||^2 at the last root-level exchange


class TreeEASGDState(NamedTuple):
  inner: Any                # inner optimizer state, per worker
  group_center: Any         # z_g of this worker's group (equal within a group), per worker
  shared: TreeEASGDShared


def _pair(name, value, check):
  """``(low, high)``, each passed through ``check(name[level], v)``."""
  if not isinstance(value, (tuple, list)) or len(value) != 2:
    raise ValueError(f"`{name}` must be a pair (low, high), got {value!r}.")
  return tuple(check(f"{name}[{lvl}]", v) for v, lvl in zip(value, ("low", "high")))


def tree_easgd(inner: optax.GradientTransformation, *, group_axis, global_axis,
               sync_period=(1, 4), alpha=None, beta: float = 0.9
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
  ``group_axis``); the root is shared (:func:`easgd_center`). Use with
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
  all_axes = _axes_tuple(global_axis) + _axes_tuple(group_axis)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    p = base.tree_copy(params)
    return TreeEASGDState(inner.init(params), p, TreeEASGDShared(
        **base.clock(0), num_root_exchanges=zero,
        last_root_exchange=zero, target=None, center=p, distance=jnp.zeros([], jnp.float32),
        root_distance=jnp.zeros([], jnp.float32)))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("tree_easgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(group_axis)
    base.check_axis_name(global_axis)
    base.check_same_structure("grads", grads, "params", params)
    if alpha is None:
      a_low = _moving_rate(None, beta, group_axis, "alpha[low]")
      a_high = _moving_rate(None, beta, global_axis, "alpha[high]")
    else:
      a_low, a_high = float(alpha[0]), float(alpha[1])
    sh = state.shared
    u, inner_state = inner.update(grads, state.inner, params, **extra)
    low = base.is_exchange_step(sh.count, sh.last_exchange, 0, low_fn)
    high = base.is_exchange_step(sh.count, sh.last_root_exchange, 0, high_fn)
    branch = low.astype(jnp.int32) + 2 * high.astype(jnp.int32)
    z = state.group_center
    clock = periodic.next_clock(low.astype(jnp.int32), sh, False)
    n_root = sh.num_root_exchanges + high.astype(jnp.int32)
    root_clock = dict(num_root_exchanges=n_root, last_root_exchange=jnp.where(
        high, sh.count + 1, sh.last_root_exchange).astype(jnp.int32))

    def make(do_low, do_high):
      def fn(u):
        if not (do_low or do_high):
          return u, z, dataclasses.replace(sh, **clock, **root_clock)
        r = sh.center
        upd, z_new, r_new = u, _tmap(_f32, z), r
        dist, rdist = sh.distance, sh.root_distance
        if do_low:
          upd, finite, step, dist = _elastic_exchange(params, u, z, a_low, group_axis,
                                                          dist_axis=all_axes)
          z_new = _tmap(lambda zz, s: zz + s, z_new, step)
        if do_high:
          # one representative per group (local index 0) so the sum is over groups
          rep = lax.axis_index(group_axis) == 0
          zfin = C.tree_is_finite(z)
          use = rep & zfin
          dz = _tmap(lambda zz, rr: _f32(zz) - _f32(rr), z, r)
          tot = C.send(_tmap(lambda d: jnp.where(use, d, jnp.zeros_like(d)), dz),
                        lambda v: lax.psum(v, all_axes))
          n_g = lax.psum(use.astype(jnp.float32), all_axes)
          rdist = lax.psum(jnp.where(use, _sqnorm(dz), 0.0), all_axes) / jnp.maximum(n_g, 1.0)
          z_new = _tmap(lambda zn, d: zn - a_high * d, z_new, dz)
          r_new = _tmap(lambda rr, t: (_f32(rr) + a_high * t).astype(rr.dtype), r, tot)
        z_new = _tmap(lambda zn, zz: zn.astype(zz.dtype), z_new, z)
        if do_low:
          upd = _reset_nonfinite(upd, finite, z_new, params)
        return upd, z_new, dataclasses.replace(
            sh, **clock, **root_clock, center=r_new,
            distance=jnp.asarray(dist, jnp.float32), root_distance=jnp.asarray(rdist, jnp.float32))
      return fn

    upd, z_new, new_shared = lax.switch(
        branch, [make(False, False), make(True, False), make(False, True), make(True, True)], u)
    return upd, TreeEASGDState(inner_state, z_new, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- DOWNPOUR


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
    zero = jnp.zeros([], jnp.int32)
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

    clock = periodic.next_clock(ex.astype(jnp.int32), sh, ex)

    # Only the shared state goes through the branch; the workers' move to the master is
    # a select after it.
    def local(acc):
      return dataclasses.replace(sh, **clock)

    def exchange(acc):
      finite = C.tree_is_finite(acc)
      tot = C.send(_tmap(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), acc),
                    lambda v: lax.psum(v, axis_name))
      if mu == 0:
        mom, step = None, tot
      else:
        mom = _tmap(lambda m, t: mu * m + t, sh.momentum, tot)
        step = mom
      master = _tmap(lambda xm, s: (_f32(xm) + s).astype(xm.dtype), sh.target, step)
      return dataclasses.replace(sh, **clock, target=master, momentum=mom)

    new_shared = lax.cond(ex, exchange, local, acc)
    upd = base.tree_where(ex, periodic.updates_to(new_shared.target, params), u)
    acc = _tmap(lambda a: jnp.where(ex, jnp.zeros_like(a), a), acc)
    return upd, DownpourState(inner_state, acc, new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
