"""What every asynchronous algorithm across processes shares: the keys of the
coordination-service store, the master's arrival log, a worker's heartbeat and rejoin,
and the master's serving loop (requests served as they arrive, dead workers found by
their heartbeats, orbax checkpoints of the master's state). The algorithms' rules and
workers: :mod:`wagrad._src.async_processes`.

Every message to the master goes into one arrival log (:func:`post`): the sender takes
the next number from a counter in the store (``<prefix>/arrivals``, atomic) and writes
the message under ``<prefix>/arrival/<number>``; the master waits on the next number
with a blocking read (:class:`Arrivals`), so it wakes when a message arrives and polls
nothing. A message is an exchange's request (tagged ``<k>-<token>``: the count it names
and the sender's incarnation), a join (``join-<token>``) or a close (``done``). The
master answers an exchange under ``<prefix>/resp/<worker>/<k>/<token>`` and a join under
``<prefix>/joined/<worker>/<token>``: every answer names the incarnation it is for, so
that an answer meant for a killed incarnation is never taken by the next. A worker writes a
heartbeat under ``<prefix>/alive/<worker>`` every :data:`HEARTBEAT_S` seconds.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import warnings

import jax
import numpy as np

from wagrad._src import bulk
from wagrad._src import kvstore
from wagrad._src.checkpoint import restore_checkpoint, save_checkpoint

HEARTBEAT_S = 0.25  # a worker's heartbeat period; the master's check_s should be >= 4x
HOLE_S = 1.0  # a log number taken but never written for this long, with later ones
              # written, is skipped: its sender died between the two


def join_backend():
  """Start this process's JAX backend: with several processes its start-up waits for
  every process's, so the master must start it too even if it computes in NumPy."""
  jax.devices()


def store_key(prefix, kind, worker, k=None):
  return f"{prefix}/{kind}/{worker:05d}" + ("" if k is None else f"/{k:09d}")


def joined_key(prefix, worker, token):
  """Where the master answers the join of one worker incarnation (its ``token``)."""
  return f"{prefix}/joined/{worker:05d}/{token}"


def server_prefix(prefix, server, num_servers):
  """The key prefix of server ``server`` of ``num_servers`` (``prefix`` itself for one)."""
  return prefix if num_servers == 1 else f"{prefix}/server{server:03d}"


def check_servers(server, num_servers):
  """Validate a server's index among ``num_servers`` (sharded serving)."""
  if not isinstance(num_servers, int) or num_servers < 1:
    raise ValueError(f"`num_servers` must be an integer >= 1, got {num_servers!r}.")
  if not isinstance(server, int) or not 0 <= server < num_servers:
    raise ValueError(f"`server` must be an integer in [0, num_servers={num_servers}), "
                     f"got {server!r}.")


def shard(tree, server, num_servers):
  """Server ``server``'s slice of ``tree``: chunk ``server`` of every leaf's values,
  flattened (``np.array_split``: the chunks' sizes differ by one at most), so that an
  elementwise rule served on the slices computes what it does on the whole."""
  return jax.tree_util.tree_map(
      lambda x: np.array_split(np.asarray(x).reshape(-1), num_servers)[server], tree)


def unshard(parts, like):
  """Inverse of :func:`shard` over every server: each leaf's chunks joined in server
  order, shaped as ``like``'s."""
  return jax.tree_util.tree_map(
      lambda x, *chunks: np.concatenate(chunks).reshape(np.shape(x)), like, *parts)


def _check_worker(worker, sync_period):
  if not isinstance(sync_period, int) or sync_period < 1:
    raise ValueError(f"`sync_period` must be an integer >= 1, got {sync_period!r}.")
  if not isinstance(worker, int) or worker < 0:
    raise ValueError(f"`worker` must be an integer >= 0 (process index - 1), got {worker!r}.")


def answer_key(prefix, worker, k, token):
  """Where the master answers exchange ``k`` of one worker incarnation (its ``token``)."""
  return f"{store_key(prefix, 'resp', worker, k)}/{token}"


def incarnation_token():
  """A token naming this worker process's incarnation (never reused)."""
  return f"{os.getpid()}-{time.time_ns()}"


Message = collections.namedtuple("Message", "worker kind k token data")


def post(prefix, worker, tag, data=b""):
  """Append a message to the master's arrival log: ``tag`` is an exchange's
  ``<k>-<token>``, a join's ``join-<token>`` or ``done``; ``data`` the message's bytes."""
  n = kvstore.increment(f"{prefix}/arrivals")
  kvstore.put(f"{prefix}/arrival/{n:012d}", f"{worker:05d}/{tag}/".encode() + data)


class Arrivals:
  """The master's reader of the arrival log, in the order the messages were numbered."""

  def __init__(self, prefix):
    self.prefix, self.next, self.missing_since = prefix, 1, None

  def wait(self, timeout_s):
    """The next :data:`Message` (kind ``"exchange"``, ``"join"`` or ``"done"``),
    waiting up to ``timeout_s`` (a blocking read: no polling); None when none came."""
    key = f"{self.prefix}/arrival/{self.next:012d}"
    try:
      raw = kvstore.get(key, timeout_s)
    except TimeoutError:
      self._skip_hole()
      return None
    kvstore.delete(key)
    self.next, self.missing_since = self.next + 1, None
    worker, tag, data = raw.split(b"/", 2)
    kind, rest = tag.decode().split("-", 1) if b"-" in tag else (tag.decode(), "")
    if kind.isdigit():  # an exchange: <k>-<token>
      return Message(int(worker), "exchange", int(kind), rest, data)
    return Message(int(worker), kind, None, rest or None, data)

  def _skip_hole(self):
    """A sender killed between taking its number and writing its message leaves a hole:
    once later numbers are written and the hole has stayed for HOLE_S, skip it."""
    later = [int(k.rsplit("/", 1)[-1]) for k, _ in kvstore.listing(f"{self.prefix}/arrival/")]
    later = [n for n in later if n > self.next]
    now = time.monotonic()
    if not later:
      self.missing_since = None
    elif self.missing_since is None:
      self.missing_since = now
    elif now - self.missing_since > HOLE_S:
      self.next, self.missing_since = min(later), None


def ignored_poll(poll_s):
  """``poll_s`` of the serving functions does nothing since the master waits on arrivals."""
  if poll_s is not None:
    warnings.warn("`poll_s` is ignored and will be removed: the master waits on arrivals "
                  "(no polling).", DeprecationWarning, stacklevel=3)


def f32_zeros(tree):
  return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), tree)


class Worker:
  """What every worker process keeps: its index, period, own clock and exchange count.
  A subclass names its algorithm's key prefix (``_prefix``). With ``num_servers`` S > 1
  the server side is S processes, each owning a slice of the parameters
  (:func:`shard`); every exchange talks to all of them, its requests sent before any
  answer is awaited."""
  _prefix: str

  def __init__(self, worker: int, sync_period: int, *, timeout_s: float = 120.0,
               num_servers: int = 1):
    _check_worker(worker, sync_period)
    check_servers(0, num_servers)
    join_backend()
    self.worker, self.tau, self.timeout_s = worker, sync_period, timeout_s
    self.num_servers = num_servers
    self._token = incarnation_token()  # named in every request, join and answer
    self._prefixes = [server_prefix(self._prefix, s, num_servers) for s in range(num_servers)]
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
      for prefix in self._prefixes:
        kvstore.put(store_key(prefix, "alive", self.worker), np.int64(n).tobytes())
      n += 1
      self._beating.wait(HEARTBEAT_S)

  def close(self):
    """Tell the master this worker has finished."""
    self._beating.set()
    for prefix in self._prefixes:
      post(prefix, self.worker, "done")

  def _ask(self, payload, like):
    """This worker's exchange ``self.exchanges``: ``payload`` to the server side, its
    answer shaped as ``like`` back (a slice to and from each server, joined)."""
    S, k = self.num_servers, self.exchanges
    part = (lambda tree, s: tree) if S == 1 else (lambda tree, s: shard(tree, s, S))  # noqa: E731
    for s, prefix in enumerate(self._prefixes):  # every request out, then the answers
      post(prefix, self.worker, f"{k}-{self._token}", bulk.encode(part(payload, s)))
    parts = []
    for s, prefix in enumerate(self._prefixes):
      answer = answer_key(prefix, self.worker, k, self._token)
      parts.append(bulk.receive(answer, part(like, s), self.timeout_s))
      kvstore.delete(answer)
    return parts[0] if S == 1 else unshard(parts, like)

  def _joined(self, version):
    """What a worker keeps from a join besides the parameters (softsync: the version)."""

  def rejoin(self, params):
    """Start from the master's current parameters (the center, the server's parameters
    or the leader): what a restarted worker process does before its first step, so that
    it continues where the master is and its exchanges carry on the count the master
    kept for this worker. Returns the master's parameters, cast like ``params``. Needs
    a master serving as messages arrive (no forced ``order``)."""
    token = self._token
    for prefix in self._prefixes:
      post(prefix, self.worker, f"join-{token}")
    host = jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), v.dtype),
                                  jax.device_get(params))
    S, parts, served, version = self.num_servers, [], 0, 0
    for s, prefix in enumerate(self._prefixes):
      like = (host if S == 1 else shard(host, s, S), np.int64(0), np.int64(0))
      answer = joined_key(prefix, self.worker, token)
      theirs, n, v = bulk.receive(answer, like, self.timeout_s)
      kvstore.delete(answer)
      parts.append(theirs)
      served, version = max(served, int(n)), int(v) if s == 0 else version
    self.exchanges = served  # a server may have missed a request its sender died during
    self._joined(version)
    theirs = parts[0] if S == 1 else unshard(parts, host)
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
  ignored_poll(poll_s)
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

  def serve(i, data, k, token):
    nonlocal state
    if data is None:  # a (re)starting worker joins: answer the parameters, its count
      joined = (_params(state), np.int64(served[i]), np.int64(version(state)))
      for stale, _ in kvstore.listing(joined_key(prefix, i, "")):  # never read: its
        kvstore.delete(stale)                                    # incarnation is dead
      bulk.send(joined_key(prefix, i, token), joined)
      return
    try:
      request = bulk.decode(data, like, timeout_s)
    except Exception as e:  # its sender died before the master pulled it, or bad input
      warnings.warn(f"wagrad: exchange {k} of worker {i} could not be read and is "
                    f"skipped (its process died, or it sent another tree than the "
                    f"master's): {e}", RuntimeWarning)
      return
    state, answer = rule(state, request)
    # under the count and the incarnation the request names: that incarnation waits
    # there, whatever this master counted, and no other incarnation reads it
    bulk.send(answer_key(prefix, i, k, token), answer)
    served[i] = k + 1
    if path is not None and served.sum() % checkpoint[1] == 0:
      save()
    if callback is not None:
      callback(_params(state), served)

  arrivals, early = Arrivals(prefix), []
  for i in (() if order is None else order):  # a forced order: what comes early waits
    i = int(i)
    wanted = (i, "exchange", served[i])
    while (msg := next((m for m in early if m[:3] == wanted), None)) is None:
      if (got := arrivals.wait(timeout_s)) is None:
        raise TimeoutError(f"exchange {served[i]} of worker {i} did not arrive within "
                           f"{timeout_s} s (is it alive?).")
      early.append(got)
    early.remove(msg)
    serve(i, msg.data, msg.k, msg.token)
  gone = serve_until(prefix, num_workers, serve, lambda: set(), timeout_s, check_s,
                     arrivals, early)
  if path is not None:
    save()
  kvstore.put(f"{prefix}/center", kvstore.pack(_params(state)))
  outlive_workers(timeout_s)
  return _params(state), served, sorted(gone)


def checkpoint(directory, every):
  if directory is None:
    return None
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"`checkpoint_every` must be an integer >= 1, got {every!r}.")
  return directory, every


def serve_until(prefix, num_workers, handle, finished, timeout_s, check_s, arrivals=None,
                backlog=()):
  """Hand each message of the arrival log (``backlog`` first) to ``handle(worker, data,
  k, token)`` as it arrives, until every worker has closed, is in ``finished()`` or was
  found dead (asked whenever a wait of ``min(check_s / 4, HOLE_S / 2)`` ends idle);
  ``TimeoutError`` after ``timeout_s`` with nothing arriving. An exchange gets the count
  ``k`` and the incarnation ``token`` its request names; a join gets data and ``k``
  None, and brings a dead (or closed) worker back. Returns the dead workers."""
  arrivals = arrivals or Arrivals(prefix)
  backlog = list(backlog)
  gone: set[int] = set()
  closed: set[int] = set()
  beats: dict[int, tuple] = {}  # worker -> (last heartbeat seen, when it last moved)
  idle_since = started = time.monotonic()
  while len(finished() | closed | gone) < num_workers:
    msg = backlog.pop(0) if backlog else arrivals.wait(min(check_s / 4, HOLE_S / 2))
    now = time.monotonic()
    if msg is not None:
      idle_since = now
      i = msg.worker
      if msg.kind == "done":
        closed.add(i)
      elif msg.kind == "join":  # a restarted worker is back
        gone.discard(i)
        closed.discard(i)
        beats.pop(i, None)
        handle(i, None, None, msg.token)
      else:
        handle(i, msg.data, msg.k, msg.token)
    elif now - idle_since > timeout_s:
      raise TimeoutError(f"nothing arrived and no worker finished for {timeout_s} s; "
                         f"finished: {sorted(finished() | closed)} of {num_workers}.")
    else:  # idle: has a worker's heartbeat stopped?
      for i in set(range(num_workers)) - finished() - closed - gone:
        beat = kvstore.try_get(store_key(prefix, "alive", i))
        seen, since = beats.get(i, (None, started))
        if beat != seen:
          beats[i] = (beat, now)
        elif now - since > (check_s if beat is not None else timeout_s):
          gone.add(i)  # its heartbeat stopped (one never heard from: timeout_s to start)
  return gone


def _params(state):
  """The parameters in a master's state ``(params, extra)`` (DOWNPOUR's extra: the
  momentum)."""
  return state[0]


def outlive_workers(timeout_s):
  """With recoverable tasks JAX's shutdown barrier no longer holds process 0 (which hosts
  the coordination service) until the others leave; a worker still disconnecting when
  it has gone is terminated. Process 0 waits until no other process is alive (the
  workers, and the other servers of a sharded server side)."""
  if not jax.config.jax_enable_recoverability or jax.process_index() != 0:
    return  # the shutdown barrier waits for everyone, or it hosts no service
  deadline = time.monotonic() + timeout_s
  while kvstore.live(range(1, jax.process_count())) and time.monotonic() < deadline:
    time.sleep(0.1)
