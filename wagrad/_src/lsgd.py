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

How sure each rule is (design.md, Evidence tags):

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
  :func:`uneven_round_steps` (``any_exchange=``); every worker joins the blocking round.
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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wagrad._src import arguments
from wagrad._src import base
from wagrad._src import evaluate
from wagrad._src import collectives as C
from wagrad._src import leaders
from wagrad._src import periodic



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
  def reset_value(self):
    """What a worker reset by the rule takes exactly (wagrad.apply_updates)."""
    return self.leader_params

  def evaluated(self, params, opt_state):
    """The model the paper evaluates (wagrad.evaluated_params), from the stacked params."""
    return evaluate.leader_model(params, self.leader, self.leader_params)

  @property
  def target(self):
    return self.leader_params


class LSGDState(NamedTuple):
  inner: Any                # local optimizer state (per worker)
  losses: jax.Array         # ring buffer of the last avg_size losses (per worker)
  num_losses: jax.Array     # losses recorded so far (per worker)
  shared: LSGDShared
  reset: Any                # per worker: non-finite at this exchange, so it takes the
                            # leader (exactly, through wagrad.apply_updates)


@arguments.checked_arguments
def lsgd(inner: optax.GradientTransformation, sync_period: base.Period = 4, *,
         pull: float = 0.1, proximal: float = 0.1, avg_size: int | None = None,
         axis_name: base.AxisName = "workers", warmup_steps: int = 0,
         opt_state_sync: str = "local",
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

  Sampling: the paper's workers each sample the whole training set
  (``runner.sample``). With disjoint shards (``runner.shard``) the worker with the
  lowest training loss is the most over-fit one, and it wins the election.

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
  leaders.check_pull("pull", pull)
  leaders.check_proximal("proximal", proximal)
  avg_size = leaders.check_avg_size(avg_size, sync_period, "sync_period")
  base.check_positive_int("num_workers", num_workers, allow_none=True)
  pull, proximal = float(pull), float(proximal)
  inner = periodic.inner_with_extra_args(inner)

  def init_fn(params):
    leader_params = base.tree_copy(params)
    k = base.infer_num_workers(num_workers, axis_name)
    return LSGDState(
        inner=inner.init(params),
        losses=jnp.zeros([avg_size], jnp.float32),
        num_losses=jnp.zeros([], jnp.int32),
        shared=LSGDShared(
            **base.clock(0),
            leader_params=leader_params, leader=jnp.int32(-1),
            leader_loss=jnp.float32(jnp.inf), mix_weights=leaders.one_hot(-1, k),
            exchanged=jnp.bool_(False), pull_distance=jnp.zeros([], jnp.float32)),
        reset=jnp.bool_(False))

  def update_fn(grads, state, params=None, *, active=None, any_exchange=None, **extra):
    if params is None:
      raise TypeError("lsgd needs `params`: tx.update(grads, state, params, value=loss).")
    loss = leaders.check_value("lsgd", extra.get("value"))
    base.check_axis_name(axis_name)
    sh = state.shared
    leaders.check_num_workers(sh.mix_weights, axis_name)
    act = jnp.bool_(True) if active is None else jnp.asarray(base.unshared(active), jnp.bool_)
    base.refuse_renamed_flags("lsgd", extra)
    exchange = base.unshared(any_exchange)

    u, new_inner = periodic.local_update(
        inner, grads, state.inner, params, sh.count, warmup_steps, axis_name, **extra)
    if active is None:
      x = base.tree_add(params, u)
      inner_state = new_inner
    else:
      x = base.tree_where(act, base.tree_add(params, u), params)
      inner_state = base.tree_where(act, new_inner, state.inner)
    losses, num_losses = leaders.push_loss(state.losses, state.num_losses, loss, act)
    run_loss = leaders.running_mean(losses, num_losses)

    L_old = base.tree_cast_like(sh.leader_params, params)
    if proximal > 0:
      coef = proximal / period_fn(sh.count).astype(jnp.float32)
      on = act & (sh.count >= warmup_steps)
      x = base.tree_where(on, leaders.pull(x, L_old, coef), x)

    idx = periodic.branch_index(sh.count, sh.last_exchange, warmup_steps, period_fn,
                                exchange=exchange)

    def do_exchange(x):
      """l = argmin_j r_j (finite);  L <- x_l."""
      L_prev = base.tree_cast_like(sh.leader_params, params)
      ld, dist = leaders.elect_with_drift(run_loss, x, L_prev, axis_name)
      L = C.broadcast_from(x, ld.index, axis_name)
      new = leaders.leader_fields(sh, L, ld.index, leader_loss=jnp.asarray(ld.loss, jnp.float32),
                          pull_distance=jnp.asarray(dist, jnp.float32))
      # no finite worker: nothing is elected, the step is a local one
      new = base.tree_where(ld.ok, new, {k: getattr(sh, k) for k in new})
      return dict(new, exchanged=ld.ok, assign=ld.ok & (pull == 1.0)), C.tree_is_finite(x)

    def move(x, shared, finite):
      """x_i <- x_i - c (x_i - L) (c = 1: L exactly); a non-finite worker takes L."""
      L = base.tree_cast_like(shared.leader_params, x)
      pulled = base.tree_where(finite, L if pull == 1.0 else leaders.pull(x, L, pull), L)
      return base.tree_where(shared.exchanged, pulled, x)

    x_new, new_shared, inner_state, finite = periodic.exchange_step(
        idx, sh, x, do_exchange, move=move, warmup_steps=warmup_steps, axis_name=axis_name,
        warmup_end=lambda x0: leaders.leader_fields(sh, x0, 0, pull_distance=jnp.zeros([], jnp.float32)),
        opt_state=(opt_state_sync, inner, inner_state))
    updates = periodic.updates_to(x_new, params)
    reset = (idx == periodic.EXCHANGE) & new_shared.exchanged & ~finite
    inner_state = periodic.reset_inner_where(reset, inner, inner_state, x_new,
                                             (idx == periodic.EXCHANGE) & new_shared.exchanged)
    return updates, LSGDState(inner_state, losses, num_losses, new_shared, reset)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
