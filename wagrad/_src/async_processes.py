"""The asynchronous rules across processes (EASGD, DOWNPOUR, n-softsync, LSGD, WP-SGD):
each worker is its own JAX process stepping at its own pace; a master process keeps
the center (EASGD) or the parameter server's parameters (DOWNPOUR, ...) and answers
each worker's exchange when it arrives
(arXiv 1412.6651, Algorithm 1; Dean et al. 2012). No lockstep: a slow worker delays no
one but itself.

Worker i, every step, with its own clock ``t_i`` and its local step ``u_i``::

    x_i <- x_i + u_i                     (t_i mod tau != 0)
    x_i <- x_i + u_i - e,  e = alpha (x_i - x~)      (t_i mod tau == 0, first step included)

and the master, for each exchange in the order it serves them::

    x~ <- x~ + e

with ``x_i`` the worker's parameters before the step: the same rule as the simulated
:func:`wagrad.async_easgd` (``order="sequential"``), which a test checks step for step
under a forced serving order. A worker offers its parameters on JAX's transfer server
and names them under a key of its own in the coordination-service store
(:mod:`wagrad._src.bulk`, :mod:`wagrad._src.kvstore`), then waits (with a timeout) for
``e`` the same way; the master serves whatever has arrived.

DOWNPOUR: worker i accumulates its local steps, ``Delta_i += u_i``, and after every
tau-th of its steps pushes ``Delta_i``; the master applies ``m <- mu m + Delta_i``,
``x_M <- x_M + m`` (``m = Delta_i`` when mu = 0) and answers ``x_M``, which the worker
takes (``Delta_i <- 0``): :class:`DownpourWorker`, :func:`serve_downpour`.

Staleness-aware n-softsync SGD: :mod:`wagrad._src.async_softsync`.

Asynchronous LSGD and WP-SGD, the rules that rank workers:
:mod:`wagrad._src.async_ranked`.

Start-up: every process calls ``wagrad.initialize_distributed``; process 0 runs the
master (``serve_*``) and workers ``1..N`` (worker index = process index - 1) step with
the algorithm's worker class. The machinery they share (keys, heartbeats, rejoin, the
serving loop, checkpoints): :mod:`wagrad._src.async_serving`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from wagrad._src import arguments
from wagrad._src import downpour
from wagrad._src import elastic
from wagrad._src import kvstore
from wagrad._src.async_serving import (check_servers, checkpoint, f32_zeros, join_backend,
                                       serve, server_prefix, shard, unshard, Worker)
from wagrad._src.base import PyTree

PREFIX = "wagrad/easgd"
DOWNPOUR_PREFIX = "wagrad/downpour"


def master_exchange(center: PyTree, x: PyTree, alpha: float) -> tuple[PyTree, PyTree]:
  """The master's side of one asynchronous elastic exchange: ``e = alpha (x - c)``,
  ``c <- c + e``, EASGD's own exchange with one worker (:func:`elastic.exchange_with_one`,
  jitted on the master's device); non-finite parameters are left out (``e = 0``).
  NumPy trees in, ``(new_center, e)`` out (float32 arithmetic)."""
  center, e, _ = jax.device_get(_exchange_with_one(center, x, np.float32(alpha)))
  return center, e


_exchange_with_one = jax.jit(elastic.exchange_with_one)


class EASGDWorker(Worker):
  """One worker process of asynchronous EASGD.

  Use :meth:`apply_updates` in place of ``optax.apply_updates`` after the local step
  (its inner optimizer's updates, computed at the current parameters)::

      worker = wagrad.async_.EASGDWorker(jax.process_index() - 1, sync_period=4)
      for batch in batches:
        loss, g = jax.value_and_grad(loss_fn)(params, batch)
        u, opt_state = inner.update(g, opt_state, params)
        params = worker.apply_updates(params, u)
      worker.close()

  Args:
    worker: this worker's index in ``[0, N)``.
    sync_period: tau >= 1, in this worker's own steps.
    timeout_s: longest wait for the master's answer (``TimeoutError`` after it).
    num_servers: S, the server processes of a sharded master (:func:`serve_easgd`);
      the worker talks to all of them, a slice of its parameters to each.
  """
  _prefix = PREFIX

  def due(self) -> bool:
    """This step exchanges with the master (``clock mod tau == 0``)."""
    return self.clock % self.tau == 0

  def apply_updates(self, params, updates):
    """``params + updates``, minus the elastic difference on exchange steps. A worker
    whose parameters went non-finite takes the master's center at its next exchange
    step (through :meth:`rejoin`; it needs a master serving as messages arrive)."""
    if not self.due():
      self.clock += 1
      return optax.apply_updates(params, updates)
    host = jax.device_get(params)
    self.clock += 1
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host)):
      # no elastic step repairs non-finite parameters (the master would leave them
      # out): this worker takes the master's center instead, as a restarted one does
      return self.rejoin(params)
    e = self._ask(host, f32_zeros(host))
    self.exchanges += 1
    return jax.tree_util.tree_map(
        lambda x, u, d: (x.astype(np.float32) + u.astype(np.float32) - d).astype(x.dtype),
        params, updates, e)

  def center(self, like):
    """The master's final center (written when the master stops), shaped as ``like``."""
    host = jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), v.dtype),
                                  jax.device_get(like))
    S = self.num_servers
    parts = [kvstore.unpack(kvstore.get(f"{prefix}/center", self.timeout_s),
                            host if S == 1 else shard(host, s, S))
             for s, prefix in enumerate(self._prefixes)]
    return parts[0] if S == 1 else unshard(parts, host)


@arguments.checked_arguments(where="wagrad.async_")
def serve_easgd(params0: PyTree, num_workers: int, *, alpha: float,
                order: Sequence[int] | None = None, timeout_s: float = 120.0,
                poll_s: float | None = None, check_s: float = 2.0,
                callback: Callable[[PyTree, np.ndarray], Any] | None = None,
                checkpoint_dir: str | None = None, checkpoint_every: int = 100,
                server: int = 0, num_servers: int = 1
                ) -> tuple[PyTree, np.ndarray, list[int]]:
  """Run the master of asynchronous EASGD in this process until every worker has closed.

  Args:
    params0: the initial parameters (the center starts there).
    num_workers: N, the number of worker processes.
    alpha: the moving rate in (0, 1).
    order: optional forced serving order, a sequence of worker indices (one entry per
      exchange): the master then serves worker ``order[0]``'s next exchange first, and
      so on, waiting for each; default: the requests in the order they arrive.
    timeout_s: with ``order``, the longest wait for one exchange; without, the longest
      time with nothing arriving before ``TimeoutError``.
    poll_s: ignored (deprecated): the master waits on arrivals, polling nothing.
    check_s: a worker whose heartbeat (written every ``HEARTBEAT_S`` = 0.25 s by a
      thread of the worker) has not moved for this long is dead (its process killed)
      and no longer waited for, until it rejoins (:meth:`EASGDWorker.rejoin`); a worker
      not heard from at all (still starting) gets ``timeout_s``.
      Keeping the others running when a process dies needs
      ``jax.config.update("jax_enable_recoverability", True)`` in every process before
      ``wagrad.initialize_distributed`` (JAX otherwise stops every process).
    callback: optional ``callback(center, served)`` after each exchange served (e.g.
      to log or evaluate the center as training goes; it runs in the master's loop).
    checkpoint_dir: where the master saves its state and its per-worker counts with
      orbax (every ``checkpoint_every`` exchanges served and at the end); a master
      started with a directory that holds a checkpoint resumes from it, and its
      workers continue with :meth:`EASGDWorker.rejoin`. Process 0 hosts JAX's
      coordination service, so when the master dies the whole job restarts.
    checkpoint_every: exchanges served between two checkpoints.
    server, num_servers: a sharded master: this process is server ``server`` of S =
      ``num_servers`` (processes ``0..S-1``; the workers are processes ``S..S+N-1``,
      worker index = process index - S, each built with ``num_servers=S``). Each
      server keeps chunk ``server`` of every leaf's values (``np.array_split`` of the
      flattened leaf) and serves the same rule on it; the rule is elementwise, so the
      result is the unsharded one. S = 1 (default): one master, process 0.

  Returns:
    ``(center, served, gone)``: the final center (NumPy tree; with S > 1 this server's
    chunks, flat), the number of exchanges served per worker and the workers found
    dead. The center is also written for :meth:`EASGDWorker.center`.
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
  check_servers(server, num_servers)
  join_backend()
  center = jax.tree_util.tree_map(lambda x: np.array(x), jax.device_get(params0))
  if num_servers > 1:
    center = shard(center, server, num_servers)
  like = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), center)

  def rule(state, x):
    center, e = master_exchange(state[0], x, alpha)
    return (center, None), e
  return serve(server_prefix(PREFIX, server, num_servers), (center, None), like, rule,
               num_workers, order, timeout_s, poll_s, check_s, callback,
               checkpoint=checkpoint(checkpoint_dir, checkpoint_every))


def master_push(state: tuple, delta: PyTree, momentum: float) -> tuple[tuple, PyTree]:
  """DOWNPOUR's master for one push: ``m <- mu m + Delta``, ``x_M <- x_M + m``; answers
  ``x_M``. ``state = (x_M, m)`` (``m`` None when mu = 0). DOWNPOUR's own master step
  with one worker (:func:`downpour.push_from_one`, jitted on the master's device); a
  non-finite push is left out (the worker takes ``x_M``). NumPy trees in and out."""
  x, m = jax.device_get(_push_from_one(state[0], state[1], delta, float(momentum)))
  return (x, m), x


_push_from_one = jax.jit(downpour.push_from_one, static_argnums=3)


class DownpourWorker(Worker):
  """One worker process of asynchronous DOWNPOUR.

  Use :meth:`apply_updates` in place of ``optax.apply_updates`` after the local step::

      worker = wagrad.async_.DownpourWorker(jax.process_index() - 1, sync_period=4)
      for batch in batches:
        u, opt_state = inner.update(jax.grad(loss_fn)(params, batch), opt_state, params)
        params = worker.apply_updates(params, u)
      worker.close()

  Every step accumulates ``Delta += u``; after every ``sync_period``-th of this worker's
  steps it pushes ``Delta`` to the master (:func:`serve_downpour`) and takes the
  master's parameters it gets back (``Delta <- 0``).

  Args:
    worker: this worker's index in ``[0, N)``.
    sync_period: tau >= 1, in this worker's own steps.
    timeout_s: longest wait for the master's answer (``TimeoutError`` after it).
    num_servers: S, the server processes of a sharded parameter server
      (:func:`serve_downpour`).
  """

  _prefix = DOWNPOUR_PREFIX

  def __init__(self, worker: int, sync_period: int, *, timeout_s: float = 120.0,
               num_servers: int = 1):
    super().__init__(worker, sync_period, timeout_s=timeout_s, num_servers=num_servers)
    self.accumulated: Any = None  # this worker's updates since its last push (device)

  def due(self) -> bool:
    """This step pushes (``(clock + 1) mod tau == 0``)."""
    return (self.clock + 1) % self.tau == 0

  def apply_updates(self, params, updates):
    """``params + updates``; on a push step, the master's parameters."""
    u = jax.tree_util.tree_map(lambda v: jax.numpy.asarray(v, jax.numpy.float32), updates)
    acc = u if self.accumulated is None else jax.tree_util.tree_map(  # on the device
        lambda a, b: a + b, self.accumulated, u)
    if not self.due():
      self.accumulated, self.clock = acc, self.clock + 1
      return optax.apply_updates(params, updates)
    like = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), x.dtype), params)
    x_m = self._ask(jax.device_get(acc), like)
    self.accumulated, self.clock, self.exchanges = None, self.clock + 1, self.exchanges + 1
    return jax.tree_util.tree_map(lambda x, m: jax.numpy.asarray(m, x.dtype), params, x_m)



@arguments.checked_arguments(where="wagrad.async_")
def serve_downpour(params0: PyTree, num_workers: int, *, momentum: float = 0.0,
                   order: Sequence[int] | None = None, timeout_s: float = 120.0,
                   poll_s: float | None = None, check_s: float = 2.0,
                   callback: Callable[[PyTree, np.ndarray], Any] | None = None,
                   checkpoint_dir: str | None = None, checkpoint_every: int = 100,
                   server: int = 0, num_servers: int = 1
                   ) -> tuple[PyTree, np.ndarray, list[int]]:
  """Run the master (parameter server) of asynchronous DOWNPOUR until every worker has
  closed: each push ``Delta`` is applied as it arrives (:func:`master_push`) and
  answered with the master's parameters.

  Args:
    params0: the initial parameters.
    num_workers: N, the number of worker processes.
    momentum: mu in [0, 1): MDOWNPOUR's momentum on the master's update [reconstruction].
    order, timeout_s, poll_s, check_s, callback, checkpoint_dir, checkpoint_every:
      as :func:`serve_easgd`.
    server, num_servers: as :func:`serve_easgd` (a sharded parameter server, as in the
      DOWNPOUR paper).

  Returns:
    ``(params, served, gone)``: the master's final parameters (NumPy tree; with S > 1
    this server's chunks), the pushes served per worker and the workers found dead.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
  check_servers(server, num_servers)
  join_backend()
  x = jax.tree_util.tree_map(lambda v: np.array(v), jax.device_get(params0))
  if num_servers > 1:
    x = shard(x, server, num_servers)
  like = f32_zeros(x)
  state = (x, None if momentum == 0 else f32_zeros(x))
  return serve(server_prefix(DOWNPOUR_PREFIX, server, num_servers), state, like,
                lambda st, delta: master_push(st, delta, momentum), num_workers, order,
                timeout_s, poll_s, check_s, callback,
                checkpoint=checkpoint(checkpoint_dir, checkpoint_every))
