"""Pieces every periodic wagrad algorithm shares: warm-up, local step, exchange gate,
optimizer-state policy at exchanges.

A step of a periodic algorithm (count t is the shared global step)::

    if t < warmup_steps:  g <- mean_j g_j                  (synchronous SGD warm-up)
    u, inner_state <- inner.update(g, inner_state, x)      (local step)
    x_half <- x + u
    if t == warmup_steps - 1:   x <- x_half of worker 0     (exact; all equal anyway)
    elif exchange(t):           x <- rule(x_half, ...)      (the algorithm's exchange)
    else:                       x <- x_half

The branch is chosen with ``lax.switch`` on shared scalars only, so every worker takes
the same branch and no collective runs outside exchange steps (design.md, One clock).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from wagrad._src import base
from wagrad._src import collectives as C

OPT_STATE_SYNC = ("local", "average", "reset")

NO_EXCHANGE, EXCHANGE, WARMUP_END = 0, 1, 2


def check_warmup_and_policy(warmup_steps, opt_state_sync):
  """Validate ``warmup_steps`` and ``opt_state_sync`` (every rule that takes them)."""
  base.check_nonneg_int("warmup_steps", warmup_steps)
  if opt_state_sync not in OPT_STATE_SYNC:
    raise ValueError(f"unknown `opt_state_sync` {opt_state_sync!r}; choose one of {OPT_STATE_SYNC}.")


def check_common(inner, sync_period, warmup_steps, opt_state_sync, axis_name):
  """Validate the arguments every periodic algorithm takes; return the period function."""
  base.check_transform("inner", inner)
  check_warmup_and_policy(warmup_steps, opt_state_sync)
  if not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")
  return base.make_period_fn("sync_period", sync_period)


def inner_with_extra_args(inner):
  return optax.with_extra_args_support(inner)


def local_update(inner, grads, inner_state, params, count, warmup_steps, axis_name, **extra):
  """Inner optimizer step; during the warm-up the gradients are averaged over workers."""
  base.check_same_structure("grads", grads, "params", params)
  if warmup_steps > 0:
    grads = lax.cond(count < warmup_steps, lambda g: C.pmean_tree(g, axis_name),
                     lambda g: g, grads)
  return inner.update(grads, inner_state, params, **extra)


def branch_index(count, last_exchange, warmup_steps, period_fn, exchange=None):
  """0: local step only, 1: exchange, 2: end of the warm-up. Shared scalars only.

  ``exchange``: a flag given by the caller (a precomputed round table, shared by every
  worker) instead of the period; it still waits for the warm-up's end."""
  if exchange is None:
    ex = base.is_exchange_step(count, last_exchange, warmup_steps, period_fn)
  else:
    ex = jnp.asarray(exchange, jnp.bool_) & (count >= warmup_steps)
  idx = jnp.where(ex, EXCHANGE, NO_EXCHANGE)
  if warmup_steps > 0:
    idx = jnp.where(count == warmup_steps - 1, WARMUP_END, idx)
  return idx.astype(jnp.int32)


def warmup_target(x_half, axis_name):
  """Parameters at the end of the warm-up: worker 0's (bit-exact broadcast)."""
  return C.broadcast_from(x_half, jnp.int32(0), axis_name)


def sync_opt_state(policy, inner, inner_state, new_params, axis_name):
  """Apply the optimizer-state policy at an exchange.

  ``"local"``: keep every worker's inner state (DiLoCo, torchft LocalSGD).
  ``"average"``: average the floating-point leaves of the inner state over workers
  (integer leaves such as step counts are kept).
  ``"reset"``: re-initialise the inner state at the new parameters (as optax's
  lookahead ``reset_state``).
  """
  if policy == "local":
    return inner_state
  if policy == "reset":
    fresh = inner.init(new_params)
    return jax.tree_util.tree_map(lambda f, o: jnp.asarray(f).astype(o.dtype), fresh, inner_state)
  return jax.tree_util.tree_map(
      lambda x: C.pmean_tree(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      inner_state)


def reset_inner_where(flag, inner, inner_state, params, when=None):
  """The inner state re-initialised at ``params`` where ``flag`` (per worker): a
  non-finite worker reset to the rule's value restarts its optimizer, whose momentum
  may be non-finite too. ``when``: a shared flag (the step exchanged), so that the
  select over the inner state runs only on such steps (under vmap a per-worker select
  on every step cost 1.2x a momentum-EASGD step at 1M parameters); ``None`` inside a
  branch that is already such a step."""
  def reset(state):
    fresh = inner.init(params)
    return jax.tree_util.tree_map(
        lambda f, o: jnp.where(flag, jnp.asarray(f).astype(o.dtype), o), fresh, state)
  return reset(inner_state) if when is None else lax.cond(
      when, reset, lambda state: state, inner_state)


def updates_to(target, params):
  """``target - params`` per leaf, in the params' dtype (use with wagrad.apply_updates)."""
  return jax.tree_util.tree_map(lambda t, p: (t.astype(p.dtype) - p), target, params)


def require_period(name, period):
  """Validate a period that must be given (an int >= 1 or a schedule; ``None`` is
  refused by name); return the period function."""
  if period is None:
    raise ValueError(f"`{name}` must be an integer >= 1 or a schedule, got None.")
  return base.make_period_fn(name, period)


def own_clock_table(active, clock, period, first_due):
  """NumPy: which active steps fire on each worker's own clock under a period schedule.

  ``clock[t, i]`` is worker i's clock as the rule reads it at step t; a worker fires at
  an active step whose clock equals its next due value, which starts at ``first_due``
  (``None``: ``period(0)``) and moves to ``clock + period(clock)`` after each firing.
  """
  T, K = active.shape
  p = lambda c: max(int(round(float(period(int(c))))), 1)  # noqa: E731  (as make_period_fn)
  due = np.full(K, p(0) if first_due is None else first_due)
  fires = np.zeros((T, K), bool)
  for t in range(T):
    fires[t] = active[t] & (clock[t] == due)
    for i in np.nonzero(fires[t])[0]:
      due[i] = clock[t, i] + p(clock[t, i])
  return fires


def next_last_exchange(idx, count, last_exchange):
  return jnp.where(idx == NO_EXCHANGE, last_exchange, count + 1).astype(jnp.int32)


def next_clock(idx, sh, assign=None) -> dict:
  """The clock fields (:func:`base.clock`) after a step that took branch ``idx``: the
  count moves on, an exchange or the warm-up's end records itself; ``assign``
  defaults to "the warm-up ends here"."""
  return base.clock(
      sh.count + 1, next_last_exchange(idx, sh.count, sh.last_exchange),
      sh.num_exchanges + (idx != NO_EXCHANGE).astype(jnp.int32),
      idx == WARMUP_END if assign is None else assign)


def exchange_step(idx, sh, x_half, exchange, *, warmup_steps, axis_name, move=None,
                  operand=None, local_aux=None, assign=None, warmup_end=None,
                  opt_state=None, aux_is_params=False):
  """The periodic skeleton: ``lax.switch`` on ``idx`` (:func:`branch_index`), then the
  workers' move.

  Only the shared state and a small per-worker ``aux`` leave the branch; the workers'
  new parameters are a select after it (a branch that returns parameter-sized trees
  costs a copy of them on every step, measured in ``benchmarks/overhead.py``):

  * in the branch, ``exchange(operand) -> (changes, aux)``: the algorithm's rule on
    the exchange step, ``operand`` defaulting to ``x_half``; ``changes`` are the
    shared fields it sets (it may override the clock's ``assign`` / ``exchanged``),
    ``aux`` what the move needs per worker (by default a finiteness flag; the local
    branch gives ``local_aux(operand)``, by default ``True``);
  * after it, on exchange steps, ``x_new = move(x_half, shared, aux)`` (elementwise,
    no collective; by default every worker takes ``shared.target``);
  * at the end of the warm-up every worker takes worker 0's ``x_half`` (bit-exact) as
    ``shared.target``; ``warmup_end(x0) -> changes`` sets other fields too. A shared
    state without ``target`` passes the new parameters as ``aux`` instead.

  The clock fields (and ``exchanged``, where the shared state has it) move on in every
  branch; ``assign`` (default: the warm-up's end) sets ``shared.assign``, so that
  :func:`wagrad.apply_updates` takes ``target`` exactly. ``opt_state``: ``(policy,
  inner, inner_state)`` synchronises the inner optimizer's state at exchanges
  (:func:`sync_opt_state`). ``aux_is_params``: every branch returns the new parameters
  as ``aux`` (no stored target, e.g. ``model_averaging(exact=False)``); they are taken
  as they are, with no select after the branch (which would keep ``x_half`` alive and
  copy it on every step). Returns ``(x_new, shared, inner_state, aux)``.
  """
  if aux_is_params:
    local_aux, move = (lambda x: x), (lambda x, shared, aux: aux)
  clock = next_clock(idx, sh, assign)
  if "exchanged" in {f.name for f in dataclasses.fields(sh)}:
    clock["exchanged"] = idx != NO_EXCHANGE
  policy, inner, inner_state = opt_state or ("local", None, None)
  carried = None if policy == "local" else inner_state
  move = move or (lambda x, shared, aux: base.tree_cast_like(shared.target, x))
  local_aux = local_aux or (lambda operand: jnp.bool_(True))

  def local(operand, carried):
    return dataclasses.replace(sh, **clock), local_aux(operand), carried

  def on_exchange(operand, carried):
    changes, aux = exchange(operand)
    new = dataclasses.replace(sh, **{**clock, **changes})
    if carried is not None:
      carried = sync_opt_state(policy, inner, carried, move(x_half, new, aux), axis_name)
    return new, aux, carried

  has_target = getattr(sh, "target", None) is not None

  def on_warmup_end(operand, carried):
    x0 = warmup_target(x_half, axis_name)
    if warmup_end is not None:
      changes = warmup_end(x0)
    else:
      changes = {"target": base.tree_cast_like(x0, sh.target)} if has_target else {}
    # without a target the new parameters themselves are the aux (exact=False averaging)
    aux = local_aux(operand) if has_target else x0
    return dataclasses.replace(sh, **{**clock, **changes}), aux, carried

  branches = (local, on_exchange) + ((on_warmup_end,) if warmup_steps > 0 else ())
  operand = x_half if operand is None else operand
  new_shared, aux, carried = lax.switch(idx, branches, operand, carried)
  if aux_is_params:
    return aux, new_shared, (inner_state if carried is None else carried), aux
  x_new = base.tree_where(idx == EXCHANGE, move(x_half, new_shared, aux), x_half)
  if warmup_steps > 0:
    x0 = base.tree_cast_like(new_shared.target, x_half) if has_target else aux
    x_new = base.tree_where(idx == WARMUP_END, x0, x_new)
  return x_new, new_shared, (inner_state if carried is None else carried), aux
