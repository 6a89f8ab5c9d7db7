"""WP-SGD: weighted parallel SGD for unbalanced workloads (arXiv 1708.04801)
[reconstruction from the paper's abstract, via SimuParallel SGD's analysis]: nodes
that ran different numbers of steps t_i are combined with weights::

    w_i ∝ 1 - (1 - eta * lambda)^t_i    ("contraction", default)
    w_i ∝ t_i                           ("samples")
    w_i ∝ 1                             ("uniform", plain averaging)
    x <- sum_i w_i x_i / sum_i w_i

either once at the end (``sync_period=None``; :func:`wpsgd_combine`) or every
``sync_period`` steps. The reconstruction's reasoning: ``weighted.py``'s docstring.
"""

from __future__ import annotations

import math
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import evaluate
from wagrad._src import collectives as C
from wagrad._src import periodic
from wagrad._src.base import AxisName, Period, PyTree
from wagrad._src.worker_weights import (axis_workers, sized_vectors, uniform_weights,
                                        worker_vector)

_tmap = jax.tree_util.tree_map


# ----------------------------------------------------------------------------- WP-SGD

WPSGD_WEIGHTINGS = ("contraction", "samples", "uniform")
WEIGHTING_CODE = {w: i for i, w in enumerate(WPSGD_WEIGHTINGS)}


@base.shared_state
class WPSGDShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any               # the last combined model (initial params before any)
  exchanged: jax.Array      # this step combined (drives wagrad.sync_model_state)
  weights: jax.Array        # [K] normalised weights of the last combination
  mix_weights: jax.Array    # [K] = weights
  steps: jax.Array          # [K] local steps t_i that were weighted at the last combination
  weighting: jax.Array      # int32 code of the weighting rule (read by wpsgd_combine)
  decay: jax.Array          # float32 1 - eta * lambda (contraction rule; 0 otherwise)
  ok: jax.Array             # False when no worker had weight at the last combination

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return evaluate.weighted_rows(params, np.asarray(wpsgd_score(
        _find_wpsgd_state(opt_state).local_steps, self.weighting, self.decay)))


class WPSGDState(NamedTuple):
  inner: Any
  local_steps: jax.Array    # per worker: local steps t_i since the last combination
  shared: WPSGDShared


def check_wpsgd_weighting(weighting, learning_rate, strong_convexity):
  if weighting not in WPSGD_WEIGHTINGS:
    raise ValueError(f"unknown `weighting` {weighting!r}; choose one of {WPSGD_WEIGHTINGS}.")
  for nm, v in (("learning_rate", learning_rate), ("strong_convexity", strong_convexity)):
    if v is not None:
      base.check_range(nm, v, 0.0, math.inf, lo_open=True, hi_open=True)
  if weighting == "contraction":
    if learning_rate is None or strong_convexity is None:
      raise ValueError(
          "weighting='contraction' needs `learning_rate` (eta) and `strong_convexity` "
          "(lambda): w_i ∝ 1 - (1 - eta*lambda)^t_i.")
    prod = float(learning_rate) * float(strong_convexity)
    if not 0.0 < prod < 1.0:
      raise ValueError(
          f"`learning_rate` * `strong_convexity` (eta*lambda) must be in (0, 1), got {prod!r}.")
    return 1.0 - prod
  return 0.0


def wpsgd_score(t, code, decay):
  """Unnormalised weight of a worker that ran t local steps (code, decay may be traced)."""
  t = jnp.asarray(t, jnp.float32)
  contraction = 1.0 - jnp.power(jnp.asarray(decay, jnp.float32), t)
  return jnp.select([code == 0, code == 1], [contraction, t], jnp.float32(1.0))


@arguments.checked_arguments
def wpsgd(inner: optax.GradientTransformation, sync_period: Period | None = None, *,
          weighting: str = "contraction", learning_rate: float | None = None,
          strong_convexity: float | None = None, axis_name: AxisName = "workers",
          warmup_steps: int = 0, opt_state_sync: str = "local",
          num_workers: int | None = None) -> optax.GradientTransformationExtraArgs:
  """WP-SGD: weighted combination of workers that ran different numbers of steps.

  Reconstruction from the paper's abstract (arXiv 1708.04801), through SimuParallel
  SGD's analysis for a lambda-strongly convex loss and step eta. Worker i takes a
  local step only when it is active (``tx.update(grads, state, params,
  active=mask_i)``; an inactive worker gets zero updates and keeps its inner state);
  ``t_i`` counts its local steps. The models are combined as::

      s_i = 1 - (1 - eta*lambda)^t_i    ("contraction": fraction of the initial error removed)
      s_i = t_i                         ("samples")
      s_i = 1                           ("uniform": plain averaging)
      x <- sum_i s_i x_i / sum_i s_i    (non-finite workers get weight 0)

  ``sync_period=None`` (default) is one-shot: no communication during training, call
  :func:`wpsgd_combine` at the end. With ``sync_period=tau`` the workers are combined
  every tau steps (exact assignment with :func:`wagrad.apply_updates`) and ``t_i``
  restarts each round. ``shared.weights`` / ``shared.mix_weights`` hold the last
  combination's length-K weights, ``shared.steps`` the t_i they came from. During a
  warm-up every worker takes the synchronous step (``active`` applies after it).

  Args:
    inner: the local optimizer (any optax transform).
    sync_period: None (one-shot), tau >= 1, or a schedule ``step -> period``.
    weighting: ``"contraction"`` (default), ``"samples"`` or ``"uniform"``.
    learning_rate: eta of the contraction rule (required for it).
    strong_convexity: lambda of the contraction rule (required; eta*lambda in (0, 1)).
    axis_name: the worker axis.
    warmup_steps: synchronous all-reduce SGD for this many steps first.
    opt_state_sync: ``"local"``, ``"average"`` or ``"reset"`` at combinations.
    num_workers: K, optional (fixes the length of the weight vectors at ``init``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is ``WPSGDState``. ``active``
    (a per-worker bool, default True) is consumed here; other extra args go to
    ``inner``.

  Example:
    >>> import optax, wagrad
    >>> tx = wagrad.wpsgd(optax.sgd(0.05), weighting="contraction",
    ...                   learning_rate=0.05, strong_convexity=0.1)
    >>> # per-worker step: updates, state = tx.update(grads, state, params, active=a_i)
    >>> # at the end:      model = wagrad.wpsgd_combine(params, state).value

  References:
    "Weighted parallel SGD for distributed unbalanced-workload training system",
    J. Parallel Distrib. Comput. 145, 2020, arXiv 1708.04801 (reconstruction from the
    abstract). Zinkevich et al., "Parallelized Stochastic Gradient Descent",
    NeurIPS 2010.
  """
  period_fn = periodic.check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name)
  decay = check_wpsgd_weighting(weighting, learning_rate, strong_convexity)
  base.check_positive_int("num_workers", num_workers, allow_none=True)
  code = WEIGHTING_CODE[weighting]
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    n, uniform = uniform_weights(num_workers, axis_name)
    return WPSGDState(
        inner=inner.init(params),
        local_steps=jnp.zeros([], jnp.int32),
        shared=WPSGDShared(
            **base.clock(0),
            target=base.tree_copy(params), exchanged=jnp.bool_(False),
            weights=uniform, mix_weights=uniform, steps=jnp.zeros((n,), jnp.int32),
            weighting=jnp.int32(code), decay=jnp.float32(decay), ok=jnp.bool_(True)))

  def update_fn(grads, state, params=None, *, active=None, **extra):
    if params is None:
      raise TypeError("wpsgd needs `params`: tx.update(grads, state, params, active=mask).")
    base.check_axis_name(axis_name)
    K = axis_workers(axis_name)
    sh = state.shared
    weights0 = worker_vector(sh.weights, K, 1.0 / K, jnp.float32)
    mix0 = worker_vector(sh.mix_weights, K, 1.0 / K, jnp.float32)
    steps0 = worker_vector(sh.steps, K, 0, jnp.int32)
    act = jnp.bool_(True) if active is None else jnp.asarray(active).astype(jnp.bool_)
    if act.ndim != 0:
      raise ValueError(f"`active` must be this worker's scalar flag, got shape {act.shape}.")
    if warmup_steps > 0:
      act = act | (sh.count < warmup_steps)

    u, new_inner = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    u = jax.tree_util.tree_map(lambda x: jnp.where(act, x, jnp.zeros_like(x)), u)
    inner_state = base.tree_where(act, new_inner, state.inner)
    x_half = base.tree_add(params, u)
    t_i = state.local_steps + act.astype(jnp.int32)

    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn)
    exchanged = idx != periodic.NO_EXCHANGE
    sh = dataclasses.replace(sh, **sized_vectors(sh, weights=weights0, mix_weights=mix0,
                                          steps=steps0))

    def exchange(x_half):
      """x_i <- sum_j s_j x_j / sum_j s_j, s_j the score of worker j's local steps."""
      s = wpsgd_score(t_i, sh.weighting, sh.decay)
      res = C.weighted_mean(x_half, s, axis_name,
                            fallback=base.tree_cast_like(sh.target, x_half))
      wvec = C.all_gather(res.weight, axis_name).astype(jnp.float32)
      svec = C.all_gather(t_i, axis_name).astype(jnp.int32)
      return dict(target=base.tree_cast_like(res.value, sh.target), weights=wvec,
                  mix_weights=wvec, steps=svec, ok=res.ok), True

    x_new, new_shared, inner_state, _ = periodic.exchange_step(
        idx, sh, x_half, exchange, warmup_steps=warmup_steps, axis_name=axis_name,
        assign=exchanged,
        warmup_end=lambda x0: dict(target=base.tree_cast_like(x0, sh.target),
                                   mix_weights=jnp.full((K,), 1.0 / K, jnp.float32)),
        opt_state=(opt_state_sync, inner, inner_state))
    updates = periodic.updates_to(x_new, params)
    return updates, WPSGDState(
        inner=inner_state,
        local_steps=jnp.where(exchanged, 0, t_i).astype(jnp.int32),
        shared=new_shared)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_wpsgd_state(opt_state):
  nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda n: isinstance(n, WPSGDState))
  for n in nodes:
    if isinstance(n, WPSGDState):
      return n
  raise TypeError("`opt_state` holds no wpsgd state (WPSGDState).")


def wpsgd_combine(params: PyTree, opt_state: PyTree, axis_name: AxisName = "workers", *,
                  weighting: str | None = None,
                  learning_rate: float | None = None,
                  strong_convexity: float | None = None) -> C.Weighted:
  """WP-SGD's output: the workers' models combined with the WP-SGD weights.

  Reconstruction from the paper's abstract (arXiv 1708.04801); see :func:`wpsgd`. Call
  it inside a mapped function at the end of training (one-shot mode) or at any time
  (periodic mode: the steps since the last combination are weighted)::

      x = sum_i s(t_i) x_i / sum_i s(t_i)

  Args:
    params: this worker's parameters x_i.
    opt_state: the state of a :func:`wpsgd` transform (or a tree that holds one).
    axis_name: the worker axis.
    weighting: override the transform's rule (``"contraction"``, ``"samples"``,
      ``"uniform"``), e.g. to compare rules on the same run; with ``"contraction"``
      pass ``learning_rate`` and ``strong_convexity`` too.
    learning_rate: eta of an overriding contraction rule.
    strong_convexity: lambda of an overriding contraction rule.

  Returns:
    ``wagrad.Weighted(value, weight, ok)``: the combined model (identical on every
    worker), this worker's normalised weight, and ``ok`` (False when no worker has
    weight, e.g. none took a step; the value is then the transform's last combined
    model, or the initial parameters).

  Example:
    >>> import wagrad
    >>> # inside the mapped function: final = wagrad.wpsgd_combine(params, opt_state).value

  References:
    arXiv 1708.04801 (reconstruction from the abstract).
  """
  base.check_axis_name(axis_name)
  st = _find_wpsgd_state(opt_state)
  if weighting is None:
    if learning_rate is not None or strong_convexity is not None:
      raise ValueError("`learning_rate` / `strong_convexity` override the rule only with "
                       "`weighting=`.")
    code, decay = st.shared.weighting, st.shared.decay
  else:
    decay = check_wpsgd_weighting(weighting, learning_rate, strong_convexity)
    code = WEIGHTING_CODE[weighting]
  s = wpsgd_score(st.local_steps, code, decay)
  fallback = base.tree_cast_like(st.shared.target, params)
  return C.weighted_mean(params, s, axis_name, fallback=fallback)
