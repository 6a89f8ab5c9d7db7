"""Elastic averaging SGD: EASGD and EAMSGD (asynchronous EASGD:
:mod:`wagrad._src.simulated_async`; tree EASGD: :mod:`wagrad._src.hierarchical`;
DOWNPOUR, the paper's baseline: :mod:`wagrad._src.baselines`).

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

  The user's loop evaluates the gradient at :func:`eamsgd_lookahead`. In code it is
  EASGD with ``inner = chain(optax.sgd(eta), lookahead_momentum(delta))``: the inner step
  ``u_i = v_i`` takes EASGD's exchange unchanged.

The model the paper evaluates is the center: :func:`easgd_center` returns it
(``state.shared.center``; also the root of tree EASGD and DOWNPOUR's master).

Model state (BatchNorm statistics): :func:`wagrad.sync_model_state` averages it on
DOWNPOUR's exchanges (they assign) and at the end of EASGD's warm-up; elastic
exchanges leave it local (the elastic rule has no meaning for running statistics):
re-estimate the center's statistics on training data before evaluating it.

Non-finite workers: a worker whose parameters or local step are non-finite (or whose
squared distance to the center overflows float32) is left out of the center's update
(its contribution is zero) and is reset to the new center at the exchange: the state's
per-worker ``reset`` flag makes :func:`wagrad.apply_updates` assign the center exactly
(an additive update cannot repair non-finite parameters; plain ``optax.apply_updates``
leaves them non-finite). LSGD does the same with the leader.

References:
  Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
  arXiv 1412.6651. Zhang, "Distributed stochastic optimization for deep learning"
  (thesis), arXiv 1605.02216.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import compression as compression_mod
from wagrad._src import elastic
from wagrad._src import periodic
from wagrad._src.base import AxisName, Period, PyTree

_f32 = base.f32
_tmap = jax.tree_util.tree_map

def easgd_center(opt_state: PyTree) -> PyTree:
  """The center variable the paper evaluates (shared, identical on every worker).

  Works for the states of :func:`easgd`, :func:`eamsgd`, :func:`async_easgd`,
  :func:`tree_easgd` (the root) and :func:`downpour` (the master's parameters), also
  when nested in an ``optax.chain`` state. Outside a mapped function, on a runner's
  state, it returns the unstacked center.
  """
  sh = base.find_shared(opt_state, "center")
  if sh is None:
    raise TypeError("`opt_state` holds no EASGD-family state (no shared `center`): pass the "
                    "transform's state (the mapped step's `opt_state`; with Flax NNX, "
                    "`optimizer.opt_state` of `nnx.merge(graphdef, state)`).")
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

  @property
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.center

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return self.center


class EASGDState(NamedTuple):
  inner: Any
  shared: EASGDShared
  reset: Any               # per worker: non-finite at this exchange, so it takes the
                            # center (exactly, through wagrad.apply_updates)
  error: Any = None         # compression: this worker's error-feedback residual (a
                            # float32 vector over the leaves in order)


@arguments.checked_arguments
def easgd(inner: optax.GradientTransformation, sync_period: Period = 1, *,
          alpha: float | None = None, beta: float = 0.9, axis_name: AxisName = "workers",
          warmup_steps: int = 0, opt_state_sync: str = "local",
          outer_optimizer: optax.GradientTransformation | None = None,
          compression: str | None = None, error_feedback: bool = True
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
  :func:`easgd_center` (``state.shared.center``). With ``compression`` the sum
  ``sum_i (x_i - x~)`` is exchanged in bfloat16 or int8 (with error feedback), as
  :func:`model_averaging`'s; each worker's own elastic step stays exact.

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
    compression: ``None`` (float32), ``"bfloat16"`` or ``"int8"``.
    error_feedback: with ``compression``, carry each worker's quantization residual
      (state field ``error``).

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
  elastic.check_alpha_beta(alpha, beta)
  if outer_optimizer is not None:
    base.check_transform("outer_optimizer", outer_optimizer)
  compression_mod.check_mode(compression)
  feedback = compression is not None and bool(error_feedback)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    center = base.tree_copy(params)
    return EASGDState(inner.init(params), reset=jnp.bool_(False),
                      error=compression_mod.residual_like(params) if feedback else None,
                      shared=EASGDShared(
        **base.clock(0),
        target=center if warmup_steps > 0 else None, center=center,
        distance=jnp.zeros([], jnp.float32),
        outer=None if outer_optimizer is None else outer_optimizer.init(params)))

  def update_fn(grads, state, params=None, **extra):
    if params is None:
      raise TypeError("easgd needs `params`: tx.update(grads, state, params).")
    base.check_axis_name(axis_name)
    a = elastic.moving_rate(alpha, beta, axis_name)
    sh = state.shared
    u, inner_state = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)
    diff = elastic.elastic_diff(params, u, sh.center)  # x_i - x~, before the exchange

    def exchange(operand):
      """x~ <- x~ + alpha sum_i (x_i - x~) over the finite workers."""
      diff, error = operand
      if compression is None:
        finite, step, dist = elastic.center_exchange(diff, a, axis_name)
      else:
        finite, step, dist, error = elastic.compressed_center_exchange(
            diff, a, axis_name, compression, error)
      if outer_optimizer is None:
        center, outer_state = _tmap(lambda c, s: (_f32(c) + s).astype(c.dtype),
                                    sh.center, step), sh.outer
      else:
        pseudo = _tmap(lambda s, c: (-s).astype(c.dtype), step, sh.center)
        ou, outer_state = outer_optimizer.update(pseudo, sh.outer, sh.center)
        center = optax.apply_updates(sh.center, ou)
      return with_center(center, distance=jnp.asarray(dist, jnp.float32),
                         outer=outer_state), (finite, error)

    def move(x_half, shared, aux):
      """x_i <- x_i + u_i - alpha (x_i - x~); a non-finite worker takes the new x~."""
      return _tmap(lambda x, d, c: jnp.where(aux[0], (_f32(x) - a * d).astype(x.dtype),
                                             c.astype(x.dtype)), x_half, diff, shared.center)

    def with_center(center, **changes):
      return dict(center=center, target=center if warmup_steps > 0 else None, **changes)

    x_new, new_shared, inner_state, (finite, error) = periodic.exchange_step(
        idx, sh, base.tree_add(params, u), exchange, move=move, operand=(diff, state.error),
        local_aux=lambda operand: (jnp.bool_(True), operand[1]),
        warmup_steps=warmup_steps, axis_name=axis_name,
        warmup_end=lambda x0: with_center(base.tree_cast_like(x0, sh.center),
                                          distance=jnp.zeros([], jnp.float32)),
        opt_state=(opt_state_sync, inner, inner_state))
    reset = (idx == periodic.EXCHANGE) & ~finite
    inner_state = periodic.reset_inner_where(reset, inner, inner_state, x_new,
                                             idx == periodic.EXCHANGE)
    return (periodic.updates_to(x_new, params),
            EASGDState(inner_state, new_shared, reset, error))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- EAMSGD


class LookaheadMomentumState(NamedTuple):
  velocity: Any             # v_i, per worker
  momentum: jax.Array       # delta (constant; read by eamsgd_lookahead)


def lookahead_momentum(momentum: float) -> optax.GradientTransformation:
  """EAMSGD's momentum on an inner step ``u`` (``-eta g`` for ``optax.sgd(eta)``, ``g``
  taken at the look-ahead point :func:`eamsgd_lookahead`): ``v <- delta v + u``,
  returns ``v``. As ``optax.trace(momentum)``, with ``delta`` kept for the look-ahead."""
  def init_fn(params):
    return LookaheadMomentumState(_tmap(jnp.zeros_like, params), jnp.float32(momentum))

  def update_fn(updates, state, params=None):
    del params
    v = _tmap(lambda v, u: (state.momentum * _f32(v) + _f32(u)).astype(v.dtype),
              state.velocity, updates)
    return v, LookaheadMomentumState(v, state.momentum)

  return optax.GradientTransformation(init_fn, update_fn)


@arguments.checked_arguments
def eamsgd(inner: optax.GradientTransformation, sync_period: Period = 1, *,
           momentum: float = 0.99, alpha: float | None = None, beta: float = 0.9,
           axis_name: AxisName = "workers", warmup_steps: int = 0
           ) -> optax.GradientTransformationExtraArgs:
  """Elastic averaging momentum SGD (EAMSGD), synchronous.

  :func:`easgd` whose local step is momentum with the gradient taken at the look-ahead
  point ``x_i + delta v_i`` (:func:`eamsgd_lookahead`; optax's Nesterov cannot express
  it). With ``inner = optax.sgd(eta)``, every step::

      v_i <- delta v_i - eta g_i(x_i + delta v_i)
      x_i <- x_i + v_i                              (local steps)
      x_i <- x_i + v_i - alpha (x_i - x~)           (exchange steps, every tau)
      x~  <- x~ + alpha sum_i (x_i - x~)            (exchange steps)

  the elastic terms from the pre-step ``x_i`` and ``x~``. Another ``inner`` replaces
  ``-eta g``. ``momentum=0`` is :func:`easgd` with the same ``inner``. A non-finite
  worker takes the new center and a zero velocity.

  Args:
    inner: the local optimizer on the look-ahead gradient (``optax.sgd(eta)`` is the
      paper's; the momentum is EAMSGD's own, below).
    sync_period: tau >= 1 or a schedule ``step -> period``.
    momentum: delta in [0, 1); the authors' launch script uses 0.99 with eta = 0.01.
    alpha: moving rate in (0, 1); default ``beta / p``.
    beta: in (0, 1], used when ``alpha`` is None.
    axis_name: the worker axis.
    warmup_steps: synchronous SGD first, as in :func:`easgd`.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :func:`easgd`'s, with
    ``(inner state, LookaheadMomentumState)`` as its inner state.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.eamsgd(optax.sgd(0.01), sync_period=10, momentum=0.99)
    >>> # in the step: x_look = wagrad.eamsgd_lookahead(params, state)
    >>> #              grads = jax.grad(loss)(x_look, batch)

  References:
    Zhang, Choromanska, LeCun, 2015, arXiv 1412.6651, Algorithm 2.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"eamsgd takes an inner optimizer as easgd does, got {inner!r}: "
                    f"wagrad.eamsgd(optax.sgd(learning_rate), sync_period, momentum=...).")
  base.check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
  return easgd(optax.chain(inner, lookahead_momentum(float(momentum))), sync_period,
               alpha=alpha, beta=beta, axis_name=axis_name, warmup_steps=warmup_steps)


def eamsgd_lookahead(params: PyTree, opt_state: PyTree) -> PyTree:
  """The point ``x_i + delta v_i`` at which EAMSGD's gradient must be evaluated.

  Call it in the per-worker step before computing the gradient::

      x_look = wagrad.eamsgd_lookahead(params, state)
      loss, grads = jax.value_and_grad(loss_fn)(x_look, batch)
      updates, state = tx.update(grads, state, params)

  ``opt_state`` is :func:`eamsgd`'s state or a state containing one (e.g. an
  ``optax.chain`` state, a Flax ``nnx.Optimizer``'s ``opt_state``; ``params`` may then
  be ``nnx.state(model, nnx.Param)`` and the result is its pure dict).
  """
  found = [n for n in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda n: isinstance(n, LookaheadMomentumState))
      if isinstance(n, LookaheadMomentumState)]
  found = [base.pure(n) for n in found]
  params = base.pure(params)
  if not found:
    raise TypeError("`opt_state` holds no EAMSGD state (LookaheadMomentumState): "
                    "pass the state of wagrad.eamsgd(...).")
  st = found[0]
  return _tmap(lambda x, v: (_f32(x) + st.momentum * _f32(v)).astype(x.dtype),
               params, st.velocity)
