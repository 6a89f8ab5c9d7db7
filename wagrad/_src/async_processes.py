"""Asynchronous EASGD across processes: each worker is its own JAX process stepping at
its own pace; a master process keeps the center and answers each worker's elastic
exchange when it arrives (arXiv 1412.6651, Algorithm 1). No lockstep: a slow worker
delays no one but itself.

Worker i, every step, with its own clock ``t_i`` and its local step ``u_i``::

    x_i <- x_i + u_i                     (t_i mod tau != 0)
    x_i <- x_i + u_i - e,  e = alpha (x_i - x~)      (t_i mod tau == 0, first step included)

and the master, for each exchange in the order it serves them::

    x~ <- x~ + e

with ``x_i`` the worker's parameters before the step: the same rule as the simulated
:func:`wagrad.async_easgd` (``order="sequential"``), which a test checks step for step
under a forced serving order. Messages go through JAX's coordination-service store
(:mod:`wagrad._src.kvstore`): a worker writes its parameters under a key of its own and
waits (with a timeout) for ``e`` under another; the master serves whatever has arrived.

Start-up: every process calls ``wagrad.initialize_distributed``; process 0 runs
:func:`serve_easgd` and workers ``1..N`` (worker index = process index - 1) step with
an :class:`EASGDWorker`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from wagrad._src import kvstore
from wagrad._src.base import PyTree

PREFIX = "wagrad/easgd"


def master_exchange(center: PyTree, x: PyTree, alpha: float) -> tuple[PyTree, PyTree]:
  """The master's side of one asynchronous elastic exchange: ``e = alpha (x - c)``,
  ``c <- c + e``. NumPy trees in, ``(new_center, e)`` out (float32 arithmetic)."""
  e = jax.tree_util.tree_map(
      lambda xx, c: (np.float32(alpha) * (xx.astype(np.float32) - c.astype(np.float32))),
      x, center)
  new = jax.tree_util.tree_map(lambda c, d: (c.astype(np.float32) + d).astype(c.dtype),
                               center, e)
  return new, e


def _join_backend():
  """Start this process's JAX backend: with several processes its start-up waits for
  every process's, so the master must start it too even if it computes in NumPy."""
  jax.devices()


def _key(kind, worker, k=None):
  return f"{PREFIX}/{kind}/{worker:05d}" + ("" if k is None else f"/{k:09d}")


class EASGDWorker:
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
  """

  def __init__(self, worker: int, sync_period: int, *, timeout_s: float = 120.0):
    if not isinstance(sync_period, int) or sync_period < 1:
      raise ValueError(f"`sync_period` must be an integer >= 1, got {sync_period!r}.")
    if not isinstance(worker, int) or worker < 0:
      raise ValueError(f"`worker` must be an integer >= 0 (process index - 1), got {worker!r}.")
    _join_backend()
    self.worker, self.tau, self.timeout_s = worker, sync_period, timeout_s
    self.clock = 0      # this worker's own steps
    self.exchanges = 0  # exchanges done

  def due(self) -> bool:
    """This step exchanges with the master (``clock mod tau == 0``)."""
    return self.clock % self.tau == 0

  def apply_updates(self, params, updates):
    """``params + updates``, minus the elastic difference on exchange steps."""
    if not self.due():
      self.clock += 1
      return optax.apply_updates(params, updates)
    host = jax.device_get(params)
    kvstore.put(_key("req", self.worker, self.exchanges), kvstore.pack(host))
    answer = _key("resp", self.worker, self.exchanges)
    e = kvstore.unpack(kvstore.get(answer, self.timeout_s),
                       jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), host))
    kvstore.delete(answer)
    self.clock += 1
    self.exchanges += 1
    return jax.tree_util.tree_map(
        lambda x, u, d: (x.astype(np.float32) + u.astype(np.float32) - d).astype(x.dtype),
        params, updates, e)

  def close(self):
    """Tell the master this worker has finished."""
    kvstore.put(_key("done", self.worker), b"1")

  def center(self):
    """The master's final center (written when the master stops)."""
    return kvstore.get(f"{PREFIX}/center", self.timeout_s)


def serve_easgd(params0: PyTree, num_workers: int, *, alpha: float,
                order: Sequence[int] | None = None, timeout_s: float = 120.0,
                poll_s: float = 0.001, check_s: float = 2.0,
                callback: Callable[[PyTree, np.ndarray], Any] | None = None
                ) -> tuple[PyTree, np.ndarray, list[int]]:
  """Run the master of asynchronous EASGD in this process until every worker has closed.

  Args:
    params0: the initial parameters (the center starts there).
    num_workers: N, the number of worker processes.
    alpha: the moving rate in (0, 1).
    order: optional forced serving order, a sequence of worker indices (one entry per
      exchange): the master then serves worker ``order[0]``'s next exchange first, and
      so on, waiting for each; default: whatever has arrived, by worker index.
    timeout_s: with ``order``, the longest wait for one exchange; without, the longest
      time with nothing arriving before ``TimeoutError``.
    check_s: after this long with nothing arriving, ask the coordination service which
      workers are alive; a dead worker (its process killed) is no longer waited for.
      Keeping the others running when a process dies needs
      ``jax.config.update("jax_enable_recoverability", True)`` in every process before
      ``wagrad.initialize_distributed`` (JAX otherwise stops every process).
    callback: optional ``callback(center, served)`` after each exchange served (e.g.
      to log or evaluate the center as training goes; it runs in the master's loop).

  Returns:
    ``(center, served, gone)``: the final center (NumPy tree), the number of exchanges
    served per worker and the workers found dead. The center is also written for
    :meth:`EASGDWorker.center`.
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
  _join_backend()
  center = jax.tree_util.tree_map(lambda x: np.array(x), jax.device_get(params0))
  like = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), center)
  served = np.zeros(num_workers, int)

  def serve(i, data):
    nonlocal center
    center, e = master_exchange(center, kvstore.unpack(data, like), alpha)
    kvstore.put(_key("resp", i, served[i]), kvstore.pack(e))
    served[i] += 1
    if callback is not None:
      callback(center, served)

  if order is not None:
    for i in order:
      key = _key("req", int(i), served[int(i)])
      data = kvstore.get(key, timeout_s)
      kvstore.delete(key)
      serve(int(i), data)
  done: set[int] = set()
  gone: set[int] = set()
  idle_since = time.monotonic()
  while len(done | gone) < num_workers:
    pending = kvstore.listing(f"{PREFIX}/req/")
    for key, data in pending:
      kvstore.delete(key)
      serve(int(key.split("/")[-2]), data)
    done |= {i for i in range(num_workers) if i not in done
             and kvstore.try_get(_key("done", i)) is not None}
    if pending:
      idle_since = time.monotonic()
    elif time.monotonic() - idle_since > timeout_s:
      raise TimeoutError(f"no exchange and no worker closing for {timeout_s} s; "
                         f"closed: {sorted(done)} of {num_workers}.")
    elif time.monotonic() - idle_since > check_s:  # idle: has a worker died?
      waiting = [i for i in range(num_workers) if i not in done | gone]
      gone |= set(waiting) - {p - 1 for p in kvstore.live([i + 1 for i in waiting])}
      idle_since = time.monotonic() - check_s / 2
    else:
      time.sleep(poll_s)
  kvstore.put(f"{PREFIX}/center", kvstore.pack(center))
  _outlive_workers(num_workers, timeout_s)
  return center, served, sorted(gone)


def _outlive_workers(num_workers, timeout_s):
  """With recoverable tasks JAX's shutdown barrier no longer holds process 0 (which hosts
  the coordination service) until the others leave; a worker still disconnecting when
  it has gone is terminated. Wait until no worker process is alive."""
  if not jax.config.jax_enable_recoverability:
    return  # the shutdown barrier waits for everyone
  deadline = time.monotonic() + timeout_s
  while kvstore.live(range(1, num_workers + 1)) and time.monotonic() < deadline:
    time.sleep(0.1)
