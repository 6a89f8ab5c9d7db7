"""Staleness-aware asynchronous SGD: the n-softsync parameter-server protocol.

A parameter server holds the master parameters theta; lambda learners each compute a
stochastic gradient on the parameters they last pulled and push it. In the
**n-softsync** protocol (1 <= n <= lambda, n dividing lambda) the server updates as
soon as it has collected ``c = lambda / n`` gradients::

    theta <- theta - (1/c) * sum_{l pushed} (alpha0 / tau_l) * g_l          (modulated)
    theta <- theta - (1/c) * sum_{l pushed}  alpha0          * g_l          (plain ASGD)

and the learners whose gradients were applied pull the new theta. 1-softsync (c =
lambda) is hardsync; lambda-softsync (c = 1) is fully asynchronous SGD.

**Staleness** tau_l [reimpl] counts server updates: the server version the update is
applied to minus the version the learner pulled (the version increases by one per
server update). It can be 0 (always 0 in hardsync), so the divisor is
``max(tau_l, 1)`` (``zero_staleness="max1"``, default, as the reimplementation
federicovilla55/asgd_staleness, ``src/core/parameter_server_saasgd.py``) or
``tau_l + 1`` (``"plus1"``, used by another reimplementation).

This is a *protocol*, not a per-worker update (design.md, Protocols as schedules). Who
pushes, in which order, with which staleness and whether the server applies are precomputed
in NumPy by :func:`softsync_schedule` as per-step tables; the jitted part is one masked,
weighted ``psum`` of the pushed gradients (non-pushers join with weight 0).

**How a global step maps to the protocol** (the convention of this module):

* one global step = at most one server update (``apply[t]``); the generated schedules
  apply exactly one update of exactly c gradients every step;
* the c gradients of the update at step t come from the c learners that finished
  their gradient first (arrival order is ``order[t]``); every other learner keeps
  computing on its stale copy;
* a learner whose gradient was applied pulls the *new* parameters at the end of the
  step (the parameters that include its own gradient), so its next gradient's
  staleness counts the updates of the other learners in between.

With equal compute times (``arrival="round_robin"``) learners push in a fixed cyclic
order, c at a time, and every gradient after the first round has staleness exactly
``n - 1``: 0 for hardsync, lambda - 1 for lambda-softsync. The paper's "mean staleness
about n" counts one more update because its learners pull right after pushing, before
the server has applied their own gradient; here the pull sees it. Random compute times
(``arrival="random"``) spread the staleness around the same mean n - 1.

Tags (design.md, Evidence tags): the modulated update and the staleness definition are
[reimpl]; the step/arrival convention above is this library's simulation choice.

Reference:
  Zhang, Gupta, Lian, Liu, "Staleness-aware Async-SGD for Distributed Deep Learning",
  IJCAI 2016, arXiv 1511.05950.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import periodic

ARRIVALS = ("round_robin", "random")
MODULATIONS = ("inverse", "none")
ZERO_STALENESS = ("max1", "plus1")


# ----------------------------------------------------------------------------- schedule


class SoftsyncSchedule(NamedTuple):
  """Per-step tables of an n-softsync run (T steps, lambda learners).

  Attributes:
    push: bool ``[T, lambda]``: learner l's gradient is included in the server update
      at step t (it then pulls the new parameters).
    staleness: int32 ``[T, lambda]``: server version before the update at step t minus
      the version learner l holds (its last pull). For a pushing learner this is the
      staleness tau_l of its applied gradient; for the others, the age of their copy.
    apply: bool ``[T]``: the server applies an update at step t.
    order: int32 ``[T, c]``: the learners of the update at step t, in arrival order.
    version: int32 ``[T, lambda]``: server version of learner l's copy at the start of
      step t.
    num_learners: lambda.
    n: the n of n-softsync.
    c: gradients per server update, ``lambda / n``.
  """
  push: np.ndarray
  staleness: np.ndarray
  apply: np.ndarray
  order: np.ndarray
  version: np.ndarray
  num_learners: int
  n: int
  c: int

  def row(self, t: int):
    """``(push[t], staleness[t], Shared(apply[t]))``: step t's arguments for a runner.

    ``push`` and ``staleness`` are per worker (leading dimension lambda); ``apply``
    is wrapped in :class:`wagrad.Shared` so the runner passes it unstacked.
    """
    return (self.push[t], self.staleness[t], base.Shared(np.bool_(self.apply[t])))


@arguments.checked_arguments(where="wagrad.schedules")
def softsync_schedule(num_learners: int, n: int, num_steps: int, *,
                      arrival: str = "round_robin", seed: int = 0,
                      jitter: float = 0.5) -> SoftsyncSchedule:
  """Seeded, deterministic arrival tables of the n-softsync protocol.

  Event simulation: every learner starts at time 0 on version 0 and needs a compute
  time d per gradient (``round_robin``: d = 1 for everyone; ``random``: d drawn
  uniformly from ``[1 - jitter, 1 + jitter]``, seeded). Global step t is the t-th
  server update: it takes the c = lambda / n earliest finished gradients (ties go
  to the lower learner index), is applied at the time the c-th of them arrives, and
  those c learners pull version t + 1 and start their next gradient at that time.
  Staleness of a gradient applied at step t: ``t - version pulled``.

  Round-robin gives staleness exactly ``n - 1`` once every learner has pushed once
  (before that, the learners of step t < n pulled version 0: staleness t); hardsync
  (n = 1) gives 0. Random arrival gives a mean near ``n - 1`` and never more than
  ``n * (floor((1 + jitter) / (1 - jitter)) + 1)``.

  Args:
    num_learners: lambda >= 1.
    n: the n of n-softsync, 1 <= n <= lambda, dividing lambda.
    num_steps: T, the number of global steps (server updates).
    arrival: ``"round_robin"`` (equal compute times: fixed cyclic order) or
      ``"random"`` (seeded random compute times).
    seed: seed of the random compute times.
    jitter: half-width of the compute-time distribution for ``"random"``, in [0, 1).

  Returns:
    A :class:`SoftsyncSchedule`.

  Example:
    >>> from wagrad._src import staleness
    >>> s = staleness.softsync_schedule(8, 4, 100)
    >>> s.c, int(s.staleness[s.push][-1])
    (2, 3)

  References:
    Zhang et al., "Staleness-aware Async-SGD for Distributed Deep Learning",
    arXiv 1511.05950.
  """
  base.check_positive_int("num_learners", num_learners)
  base.check_positive_int("n", n)
  base.check_nonneg_int("num_steps", num_steps)
  if n > num_learners:
    raise ValueError(f"`n`={n} must be <= `num_learners`={num_learners} (n-softsync).")
  if num_learners % n:
    raise ValueError(
        f"`n`={n} must divide `num_learners`={num_learners}: the server collects "
        f"c = num_learners / n gradients per update.")
  if arrival not in ARRIVALS:
    raise ValueError(f"unknown `arrival` {arrival!r}; choose one of {ARRIVALS}.")
  base.check_range("jitter", jitter, 0.0, 1.0, hi_open=True)
  lam, T = int(num_learners), int(num_steps)
  c = lam // n
  rng = np.random.default_rng(seed)

  def durations(size):
    if arrival == "round_robin":
      return np.ones(size)
    return 1.0 + jitter * rng.uniform(-1.0, 1.0, size)

  finish = durations(lam)
  pulled = np.zeros(lam, np.int64)
  idx = np.arange(lam)
  push = np.zeros((T, lam), bool)
  stal = np.zeros((T, lam), np.int32)
  version = np.zeros((T, lam), np.int32)
  order = np.zeros((T, c), np.int32)
  for t in range(T):
    version[t] = pulled
    stal[t] = t - pulled
    arrived = np.lexsort((idx, finish))[:c]   # earliest finish first, ties: lower index
    order[t] = arrived
    push[t, arrived] = True
    now = finish[arrived].max()               # the update happens at the c-th arrival
    pulled[arrived] = t + 1
    finish[arrived] = now + durations(c)
  return SoftsyncSchedule(push, stal, np.ones(T, bool), order, version, lam, int(n), c)


# ----------------------------------------------------------------------------- transform


@base.shared_state
class StalenessShared:
  count: jax.Array          # the global step: alone decides exchanges
  last_exchange: jax.Array  # the count right after the last exchange (or warm-up end)
  num_exchanges: jax.Array  # exchanges (and warm-up ends) so far
  assign: jax.Array         # this step assigns `target` exactly (wagrad.apply_updates)
  target: Any                # None: assignment is per worker (StalenessState.reset)
  server: Any                # the master parameters theta
  inner: Any                 # the server optimizer's state (inner, on aggregated grads)
  num_gradients: jax.Array   # gradients applied so far
  last_num_gradients: jax.Array  # c of the last step (gradients actually applied)
  staleness_sum: jax.Array   # sum of the staleness of every applied gradient (float32)
  mean_staleness: jax.Array  # staleness_sum / num_gradients
  histogram: jax.Array       # int32 [staleness_bins]: applied gradients per staleness;
                             # the last bin counts staleness >= staleness_bins - 1

  @property
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.target if self.target is not None else self.server

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return self.server


class StalenessState(NamedTuple):
  version: jax.Array     # per worker: server version of the worker's copy
  staleness: jax.Array   # per worker: staleness used at the last step
  pulled: jax.Array      # per worker: pulled the server params at the last step
  shared: StalenessShared

  @property
  def reset(self):
    """A learner that pulled takes the server's parameters exactly
    (:func:`wagrad.apply_updates`)."""
    return self.pulled


_unwrap = base.unshared


def _check_args(inner, alpha0, modulation, zero_staleness, staleness_bins, axis_name):
  base.check_transform("inner", inner)
  base.check_range("alpha0", alpha0, 0.0, np.inf, lo_open=True, hi_open=True)
  if modulation not in MODULATIONS:
    raise ValueError(f"unknown `modulation` {modulation!r}; choose one of {MODULATIONS}.")
  if zero_staleness not in ZERO_STALENESS:
    raise ValueError(
        f"unknown `zero_staleness` {zero_staleness!r}; choose one of {ZERO_STALENESS}.")
  base.check_positive_int("staleness_bins", staleness_bins)
  if staleness_bins < 2:
    raise ValueError(f"`staleness_bins` must be >= 2, got {staleness_bins!r}.")
  if not isinstance(axis_name, (str, tuple)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")


def _schedule_row(push, staleness, apply, sh, state):
  """This worker's row of the schedule: ``push`` (bool), its staleness (int; by default
  the server versions since its last pull) and the shared ``apply`` flag."""
  push = jnp.asarray(_unwrap(push)).astype(bool)
  if push.ndim != 0:
    raise ValueError(f"`push` must be this worker's scalar, got shape {push.shape}.")
  if staleness is None:
    tau_int = (sh.num_exchanges - state.version).astype(jnp.int32)
  else:
    tau_int = jnp.asarray(_unwrap(staleness)).astype(jnp.int32)
    if tau_int.ndim != 0:
      raise ValueError(f"`staleness` must be this worker's scalar, got shape {tau_int.shape}.")
  apply = _unwrap(apply)
  if apply is not None and not isinstance(apply, (bool, np.bool_)):
    apply = jnp.asarray(apply).astype(bool)
    if apply.ndim != 0:
      raise ValueError(f"`apply` must be a shared scalar, got shape {apply.shape}.")
  return push, tau_int, apply


def _rate(tau, alpha0, modulation, zero_staleness):
  """The paper's staleness-dependent learning rate ``alpha = alpha0 / tau`` (``"max1"``:
  ``alpha0 / max(tau, 1)``; ``"plus1"``: ``alpha0 / (tau + 1)``; ``modulation="none"``:
  ``alpha0``)."""
  if modulation == "none":
    return jnp.float32(alpha0)
  if zero_staleness == "max1":
    return (alpha0 / jnp.maximum(tau, 1.0)).astype(jnp.float32)
  return (alpha0 / (tau + 1.0)).astype(jnp.float32)


@arguments.checked_arguments
def staleness_aware_sgd(inner: optax.GradientTransformation, *, alpha0: float = 1.0,
                        modulation: str = "inverse", zero_staleness: str = "max1",
                        staleness_bins: int = 64, axis_name: base.AxisName = "workers"
                        ) -> optax.GradientTransformationExtraArgs:
  """Staleness-aware asynchronous SGD with the n-softsync protocol (parameter server).

  Worker i is learner i; its ``params`` are the copy it last pulled. Each step takes
  the schedule row as extra arguments (``push``, ``staleness``, ``apply``, e.g. from
  :func:`softsync_schedule`'s ``row(t)``). On a step where the server applies::

      tau_l = max(staleness_l, 1)   ("max1")   or   staleness_l + 1   ("plus1")
      G     = (1/c) * sum_{l pushed} (alpha0 / tau_l) * g_l      ("inverse")
      G     = (1/c) * sum_{l pushed}  alpha0          * g_l      ("none": plain ASGD)
      theta <- theta + inner(G)
      x_l   <- theta          for every learner l that pushed (it pulls)

  c is the number of (finite) gradients pushed this step (lambda / n for an
  n-softsync schedule). With ``inner = optax.sgd(1.0)`` this is the paper's update
  ``theta <- theta - (1/c) sum_l (alpha0/tau_l) g_l``; ``optax.sgd(lr)`` with
  ``alpha0=1`` is the same rule. ``inner`` is the *server's* optimizer: it sees only
  the aggregated G, which is identical on every worker, so its state is shared
  (``state.shared.inner``), as is theta (``state.shared.server``). Extra arguments
  such as ``value=`` are not forwarded to it.

  A pushing worker's gradient that is non-finite is left out (and not counted in c);
  the worker still pulls theta. Learners that did not push keep their params
  (updates are exact zeros). Pulling is an assignment: use :func:`staleness_apply`
  to take theta bit-exactly; ``optax.apply_updates`` / ``wagrad.apply_updates``
  give ``x + (theta - x)``, within 1 ulp of theta. The server's update is one
  parameter-sized ``psum`` per step (the exchange runs only where ``apply``).

  Args:
    inner: the server optimizer applied to the aggregated gradient (any optax
      transform; ``optax.sgd(1.0)`` for the paper's rule).
    alpha0: the base learning rate alpha0 > 0 scaling every modulated gradient.
    modulation: ``"inverse"`` (alpha0 / tau_l, staleness-aware) or ``"none"``
      (plain ASGD, the baseline).
    zero_staleness: divisor for tau: ``"max1"`` (max(tau, 1), default) or
      ``"plus1"`` (tau + 1).
    staleness_bins: size of the staleness histogram in the state (>= 2).
    axis_name: the worker axis.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :class:`StalenessState`.
    ``update(grads, state, params, *, push, staleness=None, apply=None)``:

    * ``push``: this worker's bool: its gradient is in this step's update.
    * ``staleness``: this worker's int staleness; default: the transform's own count
      ``server version - state.version`` (equal to the generator's table).
    * ``apply``: shared bool (``wagrad.Shared`` through a runner, or a Python bool);
      ``None`` means every step is a server update. Pushes of a step with
      ``apply=False`` are ignored.

  Example:
    >>> import optax
    >>> from wagrad._src import staleness
    >>> tx = staleness.staleness_aware_sgd(optax.sgd(1.0), alpha0=0.1)
    >>> sched = staleness.softsync_schedule(8, 8, 100)   # lambda-softsync

  References:
    Zhang, Gupta, Lian, Liu, "Staleness-aware Async-SGD for Distributed Deep
    Learning", IJCAI 2016, arXiv 1511.05950.
  """
  _check_args(inner, alpha0, modulation, zero_staleness, staleness_bins, axis_name)
  inner = optax.with_extra_args_support(inner)
  alpha0 = float(alpha0)
  bins = int(staleness_bins)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    server = base.tree_copy(params)
    return StalenessState(
        version=zero, staleness=zero, pulled=jnp.bool_(False),
        shared=StalenessShared(
            **base.clock(0), target=None,
            server=server, inner=inner.init(server), num_gradients=zero,
            last_num_gradients=zero, staleness_sum=jnp.zeros([], jnp.float32),
            mean_staleness=jnp.zeros([], jnp.float32), histogram=jnp.zeros([bins], jnp.int32)))

  def update_fn(grads, state, params=None, *, push=None, staleness=None, apply=None,
                **extra):
    del extra  # the server optimizer sees only the aggregated gradient
    if params is None:
      raise TypeError("staleness_aware_sgd needs `params`: tx.update(grads, state, params, "
                      "push=...).")
    if push is None:
      raise TypeError("staleness_aware_sgd needs this step's schedule row: "
                      "tx.update(grads, state, params, push=..., staleness=..., apply=...).")
    base.check_axis_name(axis_name)
    base.check_same_structure("grads", grads, "params", params)
    sh = state.shared
    push, tau_int, apply = _schedule_row(push, staleness, apply, sh, state)

    def exchange(_):
      """theta <- theta + inner((1/c) sum_{l pushed} (alpha0 / tau_l) g_l)."""
      ok = push & C.tree_is_finite(grads)
      tau = tau_int.astype(jnp.float32)
      w = _rate(tau, alpha0, modulation, zero_staleness)
      num = lax.psum(ok.astype(jnp.int32), axis_name)
      # select, not multiply: a non-finite gradient of another worker must not leak in
      summed = C.send(jax.tree_util.tree_map(
          lambda g: jnp.where(ok, w * base.f32(g), jnp.zeros((), base.f32(g).dtype)), grads),
          lambda v: lax.psum(v, axis_name))
      denom = jnp.maximum(num, 1).astype(jnp.float32)
      agg = jax.tree_util.tree_map(lambda s, p: (s / denom).astype(p.dtype), summed, sh.server)
      hist = lax.psum(jnp.where(ok, jax.nn.one_hot(jnp.clip(tau_int, 0, bins - 1), bins,
                                                   dtype=jnp.int32), 0), axis_name)
      ssum = lax.psum(jnp.where(ok, tau, 0.0), axis_name)

      def server_step(_):
        u, inner_state = inner.update(agg, sh.inner, sh.server)
        return optax.apply_updates(sh.server, u), inner_state

      updated = num > 0
      server, inner_state = lax.cond(updated, server_step, lambda _: (sh.server, sh.inner),
                                     None)
      num_gradients = sh.num_gradients + num
      staleness_sum = sh.staleness_sum + ssum
      return dict(
          server=server, inner=inner_state, num_gradients=num_gradients,
          last_num_gradients=num, staleness_sum=staleness_sum,
          histogram=sh.histogram + hist,
          mean_staleness=jnp.where(num_gradients > 0, staleness_sum / jnp.maximum(
              num_gradients, 1), 0.0).astype(jnp.float32),
          # the server's version moves only when a gradient was applied
          num_exchanges=sh.num_exchanges + updated.astype(jnp.int32),
          last_exchange=jnp.where(updated, sh.count + 1, sh.last_exchange).astype(jnp.int32),
      ), jnp.bool_(True)

    def pull(x, shared, aux):
      """Every learner that pushed takes theta (exactly, with wagrad.apply_updates)."""
      return base.tree_where(push, base.tree_cast_like(shared.server, x), x)

    applied = jnp.bool_(True) if apply is None else jnp.asarray(apply, jnp.bool_)
    idx = jnp.where(applied, periodic.EXCHANGE, periodic.NO_EXCHANGE).astype(jnp.int32)
    x_new, new_shared, _, _ = periodic.exchange_step(
        idx, dataclasses.replace(sh, last_num_gradients=jnp.zeros([], jnp.int32)), params,
        exchange, move=pull, warmup_steps=0, axis_name=axis_name)
    pulled = push & applied
    new_state = StalenessState(
        version=jnp.where(pulled, new_shared.num_exchanges, state.version).astype(jnp.int32),
        staleness=tau_int, pulled=pulled, shared=new_shared)
    updates = jax.tree_util.tree_map(  # exact zeros for the others, even non-finite ones
        lambda xn, p: jnp.where(pulled, xn - p, jnp.zeros_like(p)), x_new, params)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_state(opt_state):
  nodes = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda n: isinstance(n, StalenessState))
  for n in nodes:
    if isinstance(n, StalenessState):
      return n
  return None


def staleness_apply(params, updates, opt_state):
  """Same as :func:`wagrad.apply_updates` (kept for code written against wagrad 0.1): a
  worker that pulled this step takes the server's parameters exactly."""
  if _find_state(opt_state) is None:
    raise TypeError("`opt_state` holds no staleness_aware_sgd state.")
  return base.apply_updates(params, updates, opt_state)
