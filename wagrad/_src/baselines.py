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

The pieces of model averaging's exchange (DiLoCo's outer step, the compressed mean,
``update_alpha``, Streaming DiLoCo's fragments) are in :mod:`wagrad._src.averaging_exchange`.

References:
  Zinkevich et al., "Parallelized Stochastic Gradient Descent", NeurIPS 2010.
  Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020 (post-local SGD).
  Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
  Models", arXiv 2311.08455.
  Dean et al., "Large Scale Distributed Deep Networks", NeurIPS 2012 (DOWNPOUR).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import evaluate
from wagrad._src import collectives as C
from wagrad._src import periodic
from wagrad._src.averaging_exchange import Averaging, check_averaging, fragment_due, fragments
from wagrad._src.base import AxisName, Period, PyTree

_tmap = jax.tree_util.tree_map


@base.shared_state
class SyncShared:
  count: jax.Array

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return evaluate.mean_rows(params)


class SyncSGDState(NamedTuple):
  inner: Any
  shared: SyncShared


@arguments.checked_arguments
def sync_sgd(inner: optax.GradientTransformation, *, axis_name: AxisName = "workers"
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
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.target

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return self.target if self.outer is not None else evaluate.mean_rows(params)

  @property
  def exchanged(self):
    """This step exchanged (or ended the warm-up): drives wagrad.sync_model_state, also
    with ``exact=False``, where nothing is assigned."""
    return (self.last_exchange == self.count) & (self.count > 0)


class ModelAveragingState(NamedTuple):
  inner: Any
  shared: AveragingShared
  error: Any = None         # compression: this worker's error-feedback residual e_i, a
                            # float32 vector over the leaves in order (one per fragment)
  reset: Any = None         # fragments: this worker was non-finite and takes x_global
                            # whole this step (wagrad.apply_updates)


@arguments.checked_arguments
def model_averaging(inner: optax.GradientTransformation, sync_period: Period | None = 1, *,
                    axis_name: AxisName = "workers", warmup_steps: int = 0,
                    outer_optimizer: optax.GradientTransformation | None = None,
                    opt_state_sync: str = "local", exact: bool = True,
                    compression: str | None = None, error_feedback: bool = True,
                    update_alpha: float = 0.0, num_fragments: int = 1
                    ) -> optax.GradientTransformationExtraArgs:
  """Periodic model averaging (local SGD / post-local SGD), optionally with DiLoCo's
  outer optimizer, compressed exchange and streaming fragments.

  Every step each worker takes a local step ``x_i <- x_i + inner(g_i)``. At the end of
  every ``sync_period``-th step after the warm-up the workers exchange::

      xbar = mean over finite workers of x_i
      x_global <- xbar                                  (no outer optimizer)
      x_global <- x_global + outer(x_global - xbar)     (outer optimizer, DiLoCo)
      x_i <- x_global                                    for every worker
      x_i <- (1 - alpha) x_global + alpha x_i            (update_alpha = alpha > 0)

  Use :func:`wagrad.apply_updates` to take ``x_global`` bit-exactly on exchange steps.
  A worker whose parameters are non-finite is left out of the mean (and receives the
  mean); if all are non-finite the workers go back to the last ``x_global``.
  ``update(..., active=a)`` (a per-worker bool, e.g. a row of
  :func:`wagrad.schedules.speed_schedule`) simulates stragglers and dropped workers: an inactive
  worker takes no local step, has weight 0 in the mean, and still receives it, so a
  rejoining worker is resynchronised at the next exchange.
  ``sync_period`` counts calls of ``update`` (wrap ``optax.MultiSteps`` *inside*,
  ``model_averaging(optax.MultiSteps(...).gradient_transformation(), ...)``, to count
  micro-steps).

  Communication-efficient exchange (each needs ``exact=True``, which keeps x_global):

  * ``compression``: the workers send ``d_i = x_i - x_global`` (the pseudo-gradient)
    in bfloat16 or in int8 with a float32 scale per block of 256, as a reduce-scatter
    then all-gather of quantized chunks, and ``xbar = x_global + mean_i d_i``
    (:mod:`wagrad._src.compression`); 2x or 3.9x fewer bytes than float32. With
    ``error_feedback`` each worker adds what quantization lost last time,
    ``e_i <- (d_i + e_i) - deQ(Q(d_i + e_i))`` (state field ``error``).
  * ``num_fragments`` = F > 1 (Streaming DiLoCo): the leaves are cut into F
    contiguous groups of about equal size; fragment f is exchanged, alone, after step
    ``s = floor(H (f + 1) / F) (mod H)`` of each period H (torchft's offsets), so the
    communication is spread over the period; with an outer optimizer each fragment
    has its own outer state. Needs an integer ``sync_period`` >= F and
    ``opt_state_sync="local"``.
  * ``update_alpha``: torchft's ``fragment_update_alpha``, the workers keep a share
    alpha of their own parameters at an exchange (not an exact assignment then; a
    non-finite worker takes x_global).

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
    compression: ``None`` (float32), ``"bfloat16"`` or ``"int8"``.
    error_feedback: with ``compression``, carry each worker's quantization residual.
    update_alpha: alpha in [0, 1): the share of its local parameters a worker keeps.
    num_fragments: F >= 1 fragments exchanged in turn.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``ModelAveragingState``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.model_averaging(optax.sgd(0.1), sync_period=4, warmup_steps=10)
    >>> tx8 = wagrad.model_averaging(optax.sgd(0.1), 8, compression="int8", num_fragments=4)

  References:
    Lin et al., 2020, arXiv 1808.07217; Douillard et al., 2023, arXiv 2311.08455;
    Douillard et al., "Streaming DiLoCo", 2025, arXiv 2501.18512.
  """
  period_fn = check_averaging(inner, sync_period, axis_name, warmup_steps, outer_optimizer,
                              opt_state_sync, exact, compression, update_alpha,
                              num_fragments)
  cfg = Averaging(axis_name, warmup_steps, sync_period, int(num_fragments),
                  float(update_alpha), compression,
                  compression is not None and bool(error_feedback), outer_optimizer)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    clock = base.clock(0)
    if cfg.F > 1:  # a flag per leaf: each fragment is assigned on its own steps
      clock["assign"] = _tmap(lambda x: jnp.bool_(False), params)
    return ModelAveragingState(
        inner.init(params),
        AveragingShared(**clock, target=base.tree_copy(params) if exact else None,
                        outer=cfg.outer_init(params)),
        cfg.residuals(params) if cfg.feedback else None,
        jnp.bool_(False) if cfg.F > 1 else None)

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
    if cfg.F > 1:
      return _streaming_update(cfg, x_half, params, sh, inner_state, weight, state.error)
    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)

    def exchange(operand):
      """xbar = mean_i x_i (finite, active workers); DiLoCo: x_global <- x_global +
      outer(x_global - xbar). Every worker takes the result."""
      if not exact:  # no stored x_global: the mean itself leaves the branch
        return {}, C.weighted_mean(operand, weight, axis_name, fallback=operand).value
      x_half, error = operand
      xbar, error = cfg.global_mean(x_half, sh.target, weight, error)
      target, outer_state = cfg.outer_step(sh.target, xbar, sh.outer)
      return {"target": target, "outer": outer_state}, error

    if exact:  # the residual is the per-worker aux that leaves the branch
      exchanged = idx != periodic.NO_EXCHANGE
      kw = dict(operand=(x_half, state.error), local_aux=lambda operand: operand[1],
                move=lambda x, shared, aux: cfg.take(shared.target, x),
                assign=(idx == periodic.WARMUP_END) if cfg.alpha > 0 else exchanged)
    else:
      kw = dict(assign=False, aux_is_params=True)
    x_new, shared, inner_state, error = periodic.exchange_step(
        idx, sh, x_half, exchange, warmup_steps=warmup_steps, axis_name=axis_name,
        opt_state=(opt_state_sync, inner, inner_state), **kw)
    return (periodic.updates_to(x_new, params),
            ModelAveragingState(inner_state, shared, error if cfg.feedback else None))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)



def _streaming_update(cfg, x_half, params, sh, inner_state, weight, error):
  """Streaming fragments: branch 1 + f exchanges fragment f's leaves alone (its own
  outer state), the last branch ends the warm-up; ``assign`` is a per-leaf tree."""
  F = cfg.F
  leaves_x, treedef = jax.tree_util.tree_flatten(x_half)
  leaves_t = jax.tree_util.tree_leaves(sh.target)
  frag = fragments(sh.target, F)
  due = fragment_due(sh.count, cfg.warmup_steps, cfg.sync_period, F)
  idx = jnp.where(sh.count == cfg.warmup_steps - 1, F + 1, due + 1).astype(jnp.int32)
  mine = [[j for j, g in enumerate(frag) if g == f] for f in range(F)]

  def local(operand):
    return sh.target, sh.outer, operand

  def exchange_fragment(f):
    def branch(operand):
      part = lambda xs: [xs[j] for j in mine[f]]  # noqa: E731
      xbar, new_err = cfg.global_mean(part(leaves_x), part(leaves_t), weight,
                                      None if error is None else operand[f])
      target, outer_f = cfg.outer_step(part(leaves_t), xbar,
                                       None if sh.outer is None else sh.outer[f])
      t = list(leaves_t)
      for j, v in zip(mine[f], target):
        t[j] = v
      outer = sh.outer if sh.outer is None else tuple(
          outer_f if g == f else o for g, o in enumerate(sh.outer))
      out_err = operand if error is None else tuple(
          new_err if g == f else e for g, e in enumerate(operand))
      return jax.tree_util.tree_unflatten(treedef, t), outer, out_err
    return branch

  def warmup_end(operand):
    x0 = periodic.warmup_target(x_half, cfg.axis_name)
    return base.tree_cast_like(x0, sh.target), sh.outer, operand

  branches = [local] + [exchange_fragment(f) for f in range(F)]
  if cfg.warmup_steps > 0:
    branches.append(warmup_end)
  target, outer, new_error = lax.switch(idx, branches, error)
  took = [(idx == frag[j] + 1) | (idx == F + 1) for j in range(len(leaves_x))]
  # a non-finite worker takes x_global whole at any exchange: healed one fragment at a
  # time, its other fragments' NaN would spoil the healed one's next gradient
  reset = (idx > 0) & ~C.tree_is_finite(x_half)
  assign = [t & ((cfg.alpha == 0) | (idx == F + 1)) for t in took]
  new_t = jax.tree_util.tree_leaves(target)
  mixed = jax.tree_util.tree_leaves(cfg.take(target, x_half))
  x_new = [jnp.where(tk | reset, jnp.where((idx == F + 1) | reset, nt.astype(x.dtype), m), x)
           for tk, nt, m, x in zip(took, new_t, mixed, leaves_x)]
  clock = periodic.next_clock(jnp.where(idx > 0, periodic.EXCHANGE, periodic.NO_EXCHANGE),
                              sh)
  clock["assign"] = jax.tree_util.tree_unflatten(treedef, assign)
  shared = dataclasses.replace(sh, **clock, target=target, outer=outer)
  return (periodic.updates_to(jax.tree_util.tree_unflatten(treedef, x_new), params),
          ModelAveragingState(inner_state, shared, new_error, reset))


@arguments.checked_arguments
def diloco(inner: optax.GradientTransformation | None = None, sync_period: Period = 50, *,
           outer_learning_rate: optax.ScalarOrSchedule = 0.7, outer_momentum: float = 0.9,
           inner_learning_rate: optax.ScalarOrSchedule | None = None,
           inner_weight_decay: optax.ScalarOrSchedule | None = None,
           axis_name: AxisName = "workers", warmup_steps: int = 0,
           compression: str | None = None, error_feedback: bool = True,
           update_alpha: float = 0.0, num_fragments: int = 1
           ) -> optax.GradientTransformationExtraArgs:
  """DiLoCo: H inner steps, then outer SGD with Nesterov momentum on the pseudo-gradient.

  ``model_averaging(inner, sync_period=H, outer_optimizer=sgd(outer_lr, momentum,
  nesterov=True))``: every H steps the mean pseudo-gradient
  Delta = x_global - mean_i x_i is fed to the outer optimizer, x_global <- x_global -
  outer_lr * Nesterov(Delta), and every worker restarts from x_global.

  Like every wagrad transform it takes its inner optimizer first and its period second.
  Without ``inner`` it is the paper's inner AdamW (``inner_learning_rate`` 4e-4,
  ``inner_weight_decay`` 0.1); the outer learning rate and momentum are the paper's
  (0.7, 0.9). The paper's H = 500 suits runs of tens of thousands of steps, and a run
  shorter than H steps would never exchange, so the default here is H = 50. Pass
  ``sync_period=500`` for the paper's. ``compression``, ``error_feedback``,
  ``update_alpha`` and ``num_fragments`` (Streaming DiLoCo) are :func:`model_averaging`'s.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.diloco(optax.adamw(1e-3), 500)  # the paper's H
    >>> paper = wagrad.diloco(sync_period=500)      # inner AdamW(4e-4, weight decay 0.1)
    >>> streaming = wagrad.diloco(sync_period=100, num_fragments=4, compression="int8")

  References:
    Douillard et al., "DiLoCo", arXiv 2311.08455.
  """
  if inner is None:
    inner = optax.adamw(4e-4 if inner_learning_rate is None else inner_learning_rate,
                        weight_decay=0.1 if inner_weight_decay is None else inner_weight_decay)
  elif inner_learning_rate is not None or inner_weight_decay is not None:
    raise ValueError(
        "wagrad.diloco: `inner_learning_rate` and `inner_weight_decay` build the default "
        "inner AdamW; with an `inner` optimizer they would do nothing. Set them on it, "
        "e.g. wagrad.diloco(optax.adamw(1e-3, weight_decay=0.1), sync_period=50).")
  outer = optax.sgd(outer_learning_rate, momentum=outer_momentum, nesterov=True)
  return model_averaging(inner, sync_period, axis_name=axis_name, warmup_steps=warmup_steps,
                         outer_optimizer=outer, compression=compression,
                         error_feedback=error_feedback, update_alpha=update_alpha,
                         num_fragments=num_fragments)


def one_shot_average(params: PyTree, axis_name: AxisName = "workers") -> C.Weighted:
  """SimuParallel SGD's output: mean over (finite) workers of their final parameters.

  Call it inside a mapped function at the end of training. Returns ``Weighted`` (the
  mean, each worker's weight, ok).
  """
  return C.weighted_mean(params, 1.0, axis_name)
