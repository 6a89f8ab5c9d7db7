"""What every asynchronous algorithm across processes shares: the keys of the
coordination-service store, a worker's heartbeat and rejoin, and the master's serving
loop (requests served as they arrive, dead workers found by their heartbeats, orbax
checkpoints of the master's state). The algorithms' rules and workers:
:mod:`wagrad._src.async_processes`.

A worker writes its request under ``<prefix>/req/<worker>/<k>`` and waits for the
answer under ``<prefix>/resp/<worker>/<k>``: the master answers under the count the
request names. A (re)starting worker joins under ``<prefix>/req/<worker>/join-<token>``
and reads the answer under ``<prefix>/joined/<worker>/<token>``, a token of its own
incarnation, so that an answer a killed incarnation never read is never taken by the
next. It writes a heartbeat under ``<prefix>/alive/<worker>`` every :data:`HEARTBEAT_S`
seconds and ``<prefix>/done/<worker>`` when it closes.
"""

from __future__ import annotations

import os
import threading
import time

import jax
import numpy as np

from wagrad._src import bulk
from wagrad._src import kvstore
from wagrad._src.checkpoint import restore_checkpoint, save_checkpoint

HEARTBEAT_S = 0.25  # a worker's heartbeat period; the master's check_s should be >= 4x


def join_backend():
  """Start this process's JAX backend: with several processes its start-up waits for
  every process's, so the master must start it too even if it computes in NumPy."""
  jax.devices()


def store_key(prefix, kind, worker, k=None):
  return f"{prefix}/{kind}/{worker:05d}" + ("" if k is None else f"/{k:09d}")


def joined_key(prefix, worker, token):
  """Where the master answers the join of one worker incarnation (its ``token``)."""
  return f"{prefix}/joined/{worker:05d}/{token}"


def _check_worker(worker, sync_period):
  if not isinstance(sync_period, int) or sync_period < 1:
    raise ValueError(f"`sync_period` must be an integer >= 1, got {sync_period!r}.")
  if not isinstance(worker, int) or worker < 0:
    raise ValueError(f"`worker` must be an integer >= 0 (process index - 1), got {worker!r}.")


def ask(prefix, worker, k, payload, like, timeout_s):
  """Send exchange k's request and wait for the master's answer (a NumPy tree)."""
  bulk.send(store_key(prefix, "req", worker, k), payload)
  answer = store_key(prefix, "resp", worker, k)
  out = bulk.receive(answer, like, timeout_s)
  kvstore.delete(answer)
  return out


def f32_zeros(tree):
  return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), tree)


class Worker:
  """What every worker process keeps: its index, period, own clock and exchange count.
  A subclass names its algorithm's key prefix (``_prefix``)."""
  _prefix: str

  def __init__(self, worker: int, sync_period: int, *, timeout_s: float = 120.0):
    _check_worker(worker, sync_period)
    join_backend()
    self.worker, self.tau, self.timeout_s = worker, sync_period, timeout_s
    self.clock = 0      # this worker's own steps
    self.exchanges = 0  # exchanges done
    self._beating = threading.Event()
    try:
      kvstore.client()
    except RuntimeError:
      return  # no runtime: the first exchange says so
    threading.Thread(target=self._beat, daemon=True).start()

  def _beat(self):
    """Write a heartbeat every HEARTBEAT_S seconds, so that the master can tell a slow
    worker from a dead one (JAX's ``get_live_nodes`` waits for every live process to
    call it, so a master cannot ask it alone)."""
    n = 0
    while not self._beating.is_set():
      kvstore.put(store_key(self._prefix, "alive", self.worker), np.int64(n).tobytes())
      n += 1
      self._beating.wait(HEARTBEAT_S)

  def close(self):
    """Tell the master this worker has finished."""
    self._beating.set()
    kvstore.put(store_key(self._prefix, "done", self.worker), b"1")

  def _joined(self, version):
    """What a worker keeps from a join besides the parameters (softsync: the version)."""

  def rejoin(self, params):
    """Start from the master's current parameters (the center, the server's parameters
    or the leader): what a restarted worker process does before its first step, so that
    it continues where the master is and its exchanges carry on the count the master
    kept for this worker. Returns the master's parameters, cast like ``params``. Needs
    a master serving as messages arrive (no forced ``order``)."""
    token = f"{os.getpid()}-{time.time_ns()}"  # this incarnation's own
    kvstore.put(f"{self._prefix}/req/{self.worker:05d}/join-{token}", b"")
    like = (jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), v.dtype),
                                   jax.device_get(params)), np.int64(0), np.int64(0))
    answer = joined_key(self._prefix, self.worker, token)
    theirs, served, version = bulk.receive(answer, like, self.timeout_s)
    kvstore.delete(answer)
    self.exchanges = int(served)
    self._joined(int(version))
    return jax.tree_util.tree_map(lambda x, v: jax.numpy.asarray(v, x.dtype), params, theirs)


def serve(prefix, state, like, rule, num_workers, order, timeout_s, poll_s, check_s,
           callback, version=None, checkpoint=None, to_saved=None, from_saved=None):
  """The master's loop: ``state, answer = rule(state, request)`` for each request
  (``state = (params, extra)``), in ``order`` first, then as they arrive, until every
  worker has closed or died. A worker's join (:meth:`Worker.rejoin`) is answered with
  the parameters, the exchanges served to it and ``version(state)``. ``checkpoint``:
  ``(directory, every)``, the state (``to_saved(state)``, a fixed-structure tree;
  ``from_saved`` its inverse) and the counts saved with orbax every ``every`` exchanges
  and at the end, and restored from there at the start when a checkpoint exists."""
  served = np.zeros(num_workers, np.int64)
  version = version or (lambda state: 0)
  to_saved = to_saved or (lambda state: state)
  from_saved = from_saved or (lambda saved: saved)
  path = None if checkpoint is None else os.path.join(checkpoint[0], "master")
  if path is not None and os.path.exists(path):
    saved = restore_checkpoint(path, {"state": to_saved(state), "served": served}, alone=True)
    state, served = from_saved(saved["state"]), np.asarray(saved["served"], np.int64)

  def save():
    save_checkpoint(path, {"state": to_saved(state), "served": served}, alone=True)

  def serve(i, data, tag):
    nonlocal state
    if data is None:  # a (re)starting worker joins: answer the parameters, its count
      joined = (_params(state), np.int64(served[i]), np.int64(version(state)))
      for stale, _ in kvstore.listing(joined_key(prefix, i, "")):  # never read: its
        kvstore.delete(stale)                                    # incarnation is dead
      bulk.send(joined_key(prefix, i, tag), joined)
      done.discard(i)
      return
    state, answer = rule(state, bulk.decode(data, like, timeout_s))
    # under the count the request names: the worker waits there, whatever this master
    # counted (a worker restarted from a stale count still gets its answer)
    bulk.send(store_key(prefix, "resp", i, tag), answer)
    served[i] = tag + 1
    if path is not None and served.sum() % checkpoint[1] == 0:
      save()
    if callback is not None:
      callback(_params(state), served)

  done: set[int] = set()
  if order is not None:
    for i in order:
      key = store_key(prefix, "req", int(i), served[int(i)])
      data = kvstore.get(key, timeout_s)
      kvstore.delete(key)
      serve(int(i), data, int(served[int(i)]))

  def finished():
    done.update(i for i in range(num_workers) if i not in done
                and kvstore.try_get(store_key(prefix, "done", i)) is not None)
    return done
  gone = serve_until(prefix, num_workers, serve, finished, timeout_s, poll_s, check_s)
  if path is not None:
    save()
  kvstore.put(f"{prefix}/center", kvstore.pack(_params(state)))
  outlive_workers(num_workers, timeout_s)
  return _params(state), served, sorted(gone)


def checkpoint(directory, every):
  if directory is None:
    return None
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"`checkpoint_every` must be an integer >= 1, got {every!r}.")
  return directory, every


def serve_until(prefix, num_workers, handle, finished, timeout_s, poll_s, check_s):
  """Hand each request under ``prefix`` to ``handle(worker, data)`` as it arrives, until
  every worker is in ``finished()`` or found dead (asked after ``check_s`` idle
  seconds); ``TimeoutError`` after ``timeout_s`` with nothing arriving. ``handle(worker,
  data, tag)`` gets the request's count as ``tag``; a join (key ``.../join-<token>``)
  gets data None and its token, and brings a dead worker back. Returns the dead
  workers."""
  gone: set[int] = set()
  beats: dict[int, tuple] = {}  # worker -> (last heartbeat seen, when it last moved)
  idle_since = started = time.monotonic()
  while len(finished() | gone) < num_workers:
    pending = kvstore.listing(f"{prefix}/req/")
    for key, data in pending:
      kvstore.delete(key)
      i, last = int(key.split("/")[-2]), key.split("/")[-1]
      if last.startswith("join-"):  # a restarted worker is back
        gone.discard(i)
        beats.pop(i, None)
        handle(i, None, last[len("join-"):])
      else:
        handle(i, data, int(last))
    now = time.monotonic()
    if pending:
      idle_since = now
    elif now - idle_since > timeout_s:
      raise TimeoutError(f"nothing arrived and no worker finished for {timeout_s} s; "
                         f"finished: {sorted(finished())} of {num_workers}.")
    elif now - idle_since > check_s / 4:  # idle: has a worker's heartbeat stopped?
      for i in set(range(num_workers)) - finished() - gone:
        beat = kvstore.try_get(store_key(prefix, "alive", i))
        seen, since = beats.get(i, (None, started))
        if beat != seen:
          beats[i] = (beat, now)
        elif now - since > (check_s if beat is not None else timeout_s):
          gone.add(i)  # its heartbeat stopped (one never heard from: timeout_s to start)
      time.sleep(max(poll_s, check_s / 8))
    else:
      time.sleep(poll_s)
  return gone


def _params(state):
  """The parameters in a master's state ``(params, extra)`` (DOWNPOUR's extra: the
  momentum)."""
  return state[0]


def outlive_workers(num_workers, timeout_s):
  """With recoverable tasks JAX's shutdown barrier no longer holds process 0 (which hosts
  the coordination service) until the others leave; a worker still disconnecting when
  it has gone is terminated. Wait until no worker process is alive."""
  if not jax.config.jax_enable_recoverability:
    return  # the shutdown barrier waits for everyone
  deadline = time.monotonic() + timeout_s
  while kvstore.live(range(1, num_workers + 1)) and time.monotonic() < deadline:
    time.sleep(0.1)
