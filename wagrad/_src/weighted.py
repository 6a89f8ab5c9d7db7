"""Performance-weighted model combination: WASGD, WASGD+ and WP-SGD.

**WASGD / WASGD+** (Weighted Aggregating SGD; arXiv 2004.03749, IEEE TKDE 34(10),
2022; ICDM 2019 short version). What the papers' abstracts state: workers are combined
with weights based on their performance, there is no center variable (decentralised),
and WASGD+ adds a designed sample order and a more advanced weight-evaluating
function. The equations below are a **reconstruction from the paper's abstract**
(the full text was not available), kept configurable::

    every step, worker i:   x_i <- x_i + inner(g_i)            (local step, x_half)
                            S_i <- S_i + L_i(x_i),  n_i <- n_i + 1
    every tau steps:        Lbar_i = S_i / n_i                 (running-mean loss of the round)
                            w_j = weight_fn(Lbar)_j            (sum_j w_j = 1)
                            x_w = sum_j w_j x_half_j           (one collective, no server)
                            x_i <- (1 - a) x_half_i + a x_w    (a = moving_rate)
                            S_i, n_i <- 0

  weight functions [reconstruction]: ``"boltzmann"`` ``w_j ∝ exp(-Lbar_j / T)``
  (T -> inf: plain averaging; T = 0: the best worker, LSGD-like), ``"rank"``
  ``w_j ∝ K_f - r_j`` with ``r_j`` the number of finite workers with a strictly lower
  loss and ``K_f`` the number of finite workers (the best gets K_f, ties share),
  ``"uniform"`` (plain averaging). A worker whose loss or parameters are non-finite
  gets weight 0.

  WASGD+ [reconstruction]: the loss that is weighted is *comparable* across workers:
  either the loss of each worker on a shared evaluation batch (``eval_value=``),
  averaged over the round (default), or the minibatch loss at the exchange step when
  every worker sees the same batch there (:func:`wasgd_plus_sample_order`).

**WP-SGD** (Weighted Parallel SGD for unbalanced workloads; arXiv 1708.04801, J.
Parallel Distrib. Comput. 145, 2020). The abstract states that SimuParallel-style
parallel SGD nodes that consume different amounts of data are combined with weights.
The rule below is a **reconstruction from the paper's abstract** via SimuParallel
SGD's analysis (lambda-strongly convex loss, step eta: a node that ran t_i steps
removed a fraction ``1 - (1 - eta lambda)^t_i`` of its initial error)::

    w_i ∝ 1 - (1 - eta * lambda)^t_i    ("contraction", default)
    w_i ∝ t_i                           ("samples")
    w_i ∝ 1                             ("uniform", plain averaging)
    x <- sum_i w_i x_i / sum_i w_i

  either once at the end (``sync_period=None``; :func:`wpsgd_combine`) or every
  ``sync_period`` steps (combined with periodic model averaging; t_i then counts the
  local steps of the current round). Unbalanced workloads are simulated with seeded
  activity masks (``wagrad`` schedules): ``tx.update(..., active=mask_i)``.

Rules tagged [code] (verified in authors' code): none in this module. Everything
above is [reconstruction]; the plumbing (warm-up, exact assignment, optimizer-state
policy, non-finite handling) is the library's and shared with ``model_averaging``.

The weight functions and the length-K weight vectors of the state are in
:mod:`wagrad._src.worker_weights`, WASGD+'s sample order in :mod:`wagrad._src.sample_order`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import evaluate
from wagrad._src import collectives as C
from wagrad._src import periodic
from wagrad._src.base import AxisName, Period
from wagrad._src.worker_weights import (WEIGHT_FNS, axis_workers, check_temperature, loss_weights,
                                         sized_vectors, uniform_weights, worker_vector)

LOSS_SOURCES = ("eval", "exchange_batch")


# ----------------------------------------------------------------------------- WASGD


def _mix(x_half, x_w, a, finite):
  """``(1 - a) x_i + a x_w`` per leaf in float32; a non-finite worker takes ``x_w``."""
  def mix(x, m):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = ((1.0 - a) * x.astype(acc) + a * m.astype(acc)).astype(x.dtype)
    return jnp.where(finite, y, m.astype(x.dtype))
  return jax.tree_util.tree_map(mix, x_half, x_w)


@base.shared_state
class WASGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # x_w of the last exchange (assigned exactly when a = 1)
  exchanged: jax.Array      # this step exchanged (drives wagrad.sync_model_state)
  weights: jax.Array        # [K] normalised aggregation weights of the last exchange
  mix_weights: jax.Array    # [K] weights for mixing model state (= weights)
  losses: jax.Array         # [K] the losses that were weighted at the last exchange
  ok: jax.Array             # False when no worker was finite at the last exchange

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return evaluate.weighted_rows(params, evaluate.row_weights(params, self.weights))


class WASGDState(NamedTuple):
  inner: Any
  loss_sum: jax.Array    # per worker: sum of the weighted losses since the last exchange
  loss_count: jax.Array  # per worker: how many were summed
  shared: WASGDShared


def _check_wasgd_args(inner, sync_period, temperature, moving_rate, weight_fn, axis_name,
                      warmup_steps, opt_state_sync, num_workers):
  period_fn = periodic.check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name)
  if sync_period is None:
    raise ValueError("`sync_period` must be an integer >= 1 or a schedule, got None.")
  check_temperature(temperature)
  base.check_range("moving_rate", moving_rate, 0.0, 1.0, lo_open=True)
  if weight_fn not in WEIGHT_FNS:
    raise ValueError(f"unknown `weight_fn` {weight_fn!r}; choose one of {WEIGHT_FNS}.")
  base.check_positive_int("num_workers", num_workers, allow_none=True)
  return period_fn


def _check_losses_given(name, loss_source, value, eval_value):
  """The loss WASGD weights must be given: ``value=`` (the step's loss) or, for
  ``loss_source="eval"``, ``eval_value=`` (the loss on a shared evaluation batch)."""
  if loss_source == "eval":
    if eval_value is None:
      raise TypeError(
          f"{name} with loss_source='eval' weights workers by their loss on a shared "
          f"evaluation batch: call `tx.update(grads, state, params, value=loss, "
          f"eval_value=loss_on_shared_batch)`.")
    return
  base.require_value(name, value)
  if eval_value is not None:
    raise TypeError(
        f"`eval_value` is only used by wasgd_plus with loss_source='eval' "
        f"({name} with loss_source={loss_source!r} weights `value`).")


def _weighted_transform(name, inner, period_fn, *, temperature, moving_rate, weight_fn,
                        axis_name, warmup_steps, opt_state_sync, num_workers, loss_source):
  """The WASGD / WASGD+ transform. ``loss_source``: "value" (WASGD), "eval" or
  "exchange_batch" (WASGD+)."""
  inner = periodic.inner_with_extra_args(inner)
  a = float(moving_rate)
  temperature = float(temperature)

  def init_fn(params):
    n, uniform = uniform_weights(num_workers, axis_name)
    return WASGDState(
        inner=inner.init(params),
        loss_sum=jnp.zeros([], jnp.float32),
        loss_count=jnp.zeros([], jnp.int32),
        shared=WASGDShared(
            **base.clock(0),
            target=base.tree_copy(params), exchanged=jnp.bool_(False),
            weights=uniform, mix_weights=uniform, losses=jnp.zeros((n,), jnp.float32),
            ok=jnp.bool_(True)))

  def update_fn(grads, state, params=None, *, value=None, eval_value=None, **extra):
    if params is None:
      raise TypeError(f"{name} needs `params`: tx.update(grads, state, params, value=loss).")
    _check_losses_given(name, loss_source, value, eval_value)
    base.check_axis_name(axis_name)
    K = axis_workers(axis_name)
    sh = state.shared
    weights0 = worker_vector(sh.weights, K, 1.0 / K, jnp.float32)
    mix0 = worker_vector(sh.mix_weights, K, 1.0 / K, jnp.float32)
    losses0 = worker_vector(sh.losses, K, 0.0, jnp.float32)

    if value is not None:
      extra = dict(extra, value=value)
    u, inner_state = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    x_half = base.tree_add(params, u)

    # The loss this step contributes (evaluated at the parameters passed in).
    step_loss = jnp.asarray(eval_value if loss_source == "eval" else value, jnp.float32)
    loss_sum = state.loss_sum + step_loss
    loss_count = state.loss_count + 1
    if loss_source == "exchange_batch":
      round_loss = step_loss
    else:
      round_loss = loss_sum / loss_count.astype(jnp.float32)

    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)
    sh = dataclasses.replace(sh, **sized_vectors(sh, weights=weights0, mix_weights=mix0,
                                          losses=losses0))

    def exchange(x_half):
      """w = weight_fn(Lbar); x_w = sum_j w_j x_j."""
      w = loss_weights(round_loss, axis_name, weight_fn, temperature)
      res = C.weighted_mean(x_half, w, axis_name,
                            fallback=base.tree_cast_like(sh.target, x_half))
      wvec = C.all_gather(res.weight, axis_name).astype(jnp.float32)
      lvec = C.all_gather(round_loss, axis_name).astype(jnp.float32)
      finite = jnp.bool_(True) if a == 1.0 else C.tree_is_finite(x_half)
      return dict(target=base.tree_cast_like(res.value, sh.target), weights=wvec,
                  mix_weights=wvec, losses=lvec, ok=res.ok), finite

    def move(x_half, shared, finite):
      """x_i <- (1 - a) x_i + a x_w (a = 1: x_w exactly, the default move)."""
      return _mix(x_half, base.tree_cast_like(shared.target, x_half), a, finite)

    x_new, new_shared, inner_state, _ = periodic.exchange_step(
        idx, sh, x_half, exchange, move=None if a == 1.0 else move,
        warmup_steps=warmup_steps, axis_name=axis_name,
        assign=(idx == periodic.WARMUP_END) | ((idx == periodic.EXCHANGE) & (a == 1.0)),
        warmup_end=lambda x0: dict(target=base.tree_cast_like(x0, sh.target),
                                   mix_weights=jnp.full((K,), 1.0 / K, jnp.float32)),
        opt_state=(opt_state_sync, inner, inner_state))
    updates = periodic.updates_to(x_new, params)
    exchanged = idx != periodic.NO_EXCHANGE
    return updates, WASGDState(
        inner=inner_state,
        loss_sum=jnp.where(exchanged, 0.0, loss_sum).astype(jnp.float32),
        loss_count=jnp.where(exchanged, 0, loss_count).astype(jnp.int32),
        shared=new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@arguments.checked_arguments
def wasgd(inner: optax.GradientTransformation, sync_period: Period = 4, *,
          temperature: float = 1.0, moving_rate: float = 1.0, weight_fn: str = "boltzmann",
          axis_name: AxisName = "workers", warmup_steps: int = 0,
          opt_state_sync: str = "local",
          num_workers: int | None = None) -> optax.GradientTransformationExtraArgs:
  """WASGD: periodic, performance-weighted model combination (decentralised).

  Reconstruction from the paper's abstract (arXiv 2004.03749): the abstract states
  that workers are combined with weights based on their performance and that there is
  no center variable; the rule below is this library's documented reconstruction.
  Every step each worker takes a local step and adds its minibatch loss (``value=``,
  evaluated at the parameters passed in) to a running mean; at the end of every
  ``sync_period``-th step after the warm-up::

      Lbar_i = mean of worker i's losses since the last exchange
      w = weight_fn(Lbar)                  e.g. w_j = exp(-Lbar_j/T) / sum_k exp(-Lbar_k/T)
      x_w = sum_j w_j x_j                  (one weighted all-reduce)
      x_i <- (1 - a) x_i + a x_w           (a = moving_rate; a = 1 assigns x_w exactly)

  A worker whose loss or parameters are non-finite gets weight 0 (with ``a < 1`` a
  non-finite worker takes ``x_w``); if no worker is finite, everyone goes back to the
  last ``x_w`` and ``shared.ok`` is False. Use :func:`wagrad.apply_updates` so that
  ``a = 1`` assigns ``x_w`` bit-exactly. ``shared.weights`` / ``shared.mix_weights``
  hold the last exchange's length-K weight vector (sums to 1), ``shared.losses`` the
  losses that were weighted, ``shared.exchanged`` whether this step exchanged.

  Sampling: the paper's workers each sample the whole training set
  (``runner.sample``). With disjoint shards (``runner.shard``) the worker with the
  lowest training loss is the most over-fit one, and it gets the largest weight.

  Args:
    inner: the local optimizer (any optax transform).
    sync_period: tau >= 1 or a schedule ``step -> period``.
    temperature: T >= 0 of the Boltzmann weights; ``inf`` is plain averaging and ``0``
      picks the best worker (ties share). T is in the loss's units: workers whose mean
      losses differ by T get weights in the ratio e (1 : 2.7); pick it from the spread
      of the workers' losses (``shared.losses`` holds the last exchange's), e.g. about
      their standard deviation, and rescale it when the loss is rescaled.
    moving_rate: a in (0, 1], how far each worker moves to ``x_w``.
    weight_fn: ``"boltzmann"`` (default), ``"rank"`` (``w_j ∝ K_f - r_j``, r_j the
      number of finite workers with a strictly lower loss) or ``"uniform"``.
    axis_name: the worker axis.
    warmup_steps: synchronous all-reduce SGD for this many steps first.
    opt_state_sync: ``"local"`` (default), ``"average"`` or ``"reset"`` the inner
      optimizer state at exchanges.
    num_workers: K, optional; fixes the length of the weight vectors in the state at
      ``init`` (otherwise they have length 0 until the first step, which retraces
      once and does not fit a ``lax.scan`` over steps).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``WASGDState``; ``update``
    needs ``value=loss`` (TypeError otherwise); ``value`` is also passed to ``inner``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.wasgd(optax.sgd(0.1), sync_period=4, temperature=0.5)
    >>> # in the per-worker step:
    >>> # updates, state = tx.update(grads, state, params, value=loss)
    >>> # params = wagrad.apply_updates(params, updates, state)

  References:
    "Weighted Aggregating Stochastic Gradient Descent for Parallel Deep Learning",
    IEEE TKDE 34(10), 2022, arXiv 2004.03749 (reconstruction from the abstract).
  """
  period_fn = _check_wasgd_args(inner, sync_period, temperature, moving_rate, weight_fn,
                                axis_name, warmup_steps, opt_state_sync, num_workers)
  return _weighted_transform(
      "wasgd", inner, period_fn, temperature=temperature, moving_rate=moving_rate,
      weight_fn=weight_fn, axis_name=axis_name, warmup_steps=warmup_steps,
      opt_state_sync=opt_state_sync, num_workers=num_workers, loss_source="value")


@arguments.checked_arguments
def wasgd_plus(inner: optax.GradientTransformation, sync_period: Period = 4, *,
               temperature: float = 1.0, moving_rate: float = 1.0,
               weight_fn: str = "boltzmann", loss_source: str = "eval",
               axis_name: AxisName = "workers", warmup_steps: int = 0,
               opt_state_sync: str = "local",
               num_workers: int | None = None) -> optax.GradientTransformationExtraArgs:
  """WASGD+: WASGD weighting a loss that is comparable across workers.

  Reconstruction from the paper's abstract (arXiv 2004.03749): the abstract names two
  additions, a designed sample order and a more advanced weight-evaluating function.
  Here both serve to make the weighted losses comparable (each worker otherwise
  evaluates its own minibatches), with the same exchange as :func:`wasgd`::

      x_i <- (1 - a) x_i + a sum_j w_j x_j,   w = weight_fn(Lc)

  where the comparable loss ``Lc_i`` is, by ``loss_source``:

  * ``"eval"`` (default): the mean over the round of ``eval_value``, worker i's loss
    on an evaluation batch that is the *same for every worker* at a given step (pass
    ``tx.update(grads, state, params, value=loss, eval_value=shared_batch_loss)`` on
    every step; evaluated at the parameters passed in). Default weight function:
    Boltzmann of this round-averaged comparable loss [reconstruction].
  * ``"exchange_batch"``: the minibatch loss ``value`` at the exchange step, comparable
    when the data order makes every worker see the same batch at exchange steps:
    :func:`wasgd_plus_sample_order` builds such an order (no extra forward pass).

  Sampling: the paper's workers each sample the whole training set
  (``runner.sample``). With disjoint shards (``runner.shard``) the worker with the
  lowest training loss is the most over-fit one, and it gets the largest weight.

  Args:
    inner: the local optimizer (any optax transform).
    sync_period: tau >= 1 or a schedule ``step -> period``.
    temperature: T >= 0 of the Boltzmann weights (``inf`` = plain averaging).
    moving_rate: a in (0, 1].
    weight_fn: ``"boltzmann"`` (default), ``"rank"`` or ``"uniform"``.
    loss_source: ``"eval"`` (default) or ``"exchange_batch"``.
    axis_name: the worker axis.
    warmup_steps: synchronous all-reduce SGD for this many steps first.
    opt_state_sync: ``"local"``, ``"average"`` or ``"reset"``.
    num_workers: K, optional (see :func:`wasgd`).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``WASGDState``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.wasgd_plus(optax.sgd(0.1), sync_period=8, loss_source="exchange_batch")
    >>> order = wagrad.schedules.wasgd_plus_sample_order(1000, 4, 32, steps=80, sync_period=8)
    >>> order.shape  # (steps, workers, batch): batches of worker i at step t
    (80, 4, 32)

  References:
    WASGD, IEEE TKDE 34(10), 2022, arXiv 2004.03749 (reconstruction from the
    abstract).
  """
  if loss_source not in LOSS_SOURCES:
    raise ValueError(f"unknown `loss_source` {loss_source!r}; choose one of {LOSS_SOURCES}.")
  period_fn = _check_wasgd_args(inner, sync_period, temperature, moving_rate, weight_fn,
                                axis_name, warmup_steps, opt_state_sync, num_workers)
  return _weighted_transform(
      "wasgd_plus", inner, period_fn, temperature=temperature, moving_rate=moving_rate,
      weight_fn=weight_fn, axis_name=axis_name, warmup_steps=warmup_steps,
      opt_state_sync=opt_state_sync, num_workers=num_workers, loss_source=loss_source)
