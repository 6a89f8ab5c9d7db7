"""Restarts in the asynchronous mode, on an in-memory store standing for JAX's
coordination service (one process, threads): a worker killed between posting its join
and reading the answer must not leave an answer that its next incarnation takes, and
the master answers each exchange under the count the request names."""
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from wagrad._src import async_processes, async_serving, bulk, kvstore


class Store:
  """The calls of wagrad._src.kvstore, on a dict."""

  def __init__(self):
    self.data, self.cond = {}, threading.Condition()

  def put(self, key, value):
    with self.cond:
      self.data[key] = value
      self.cond.notify_all()

  def get(self, key, timeout_s):
    with self.cond:
      if not self.cond.wait_for(lambda: key in self.data, timeout_s):
        raise TimeoutError(f"no value under {key!r} within {timeout_s} s")
      return self.data[key]

  def try_get(self, key):
    with self.cond:
      return self.data.get(key)

  def listing(self, prefix):
    with self.cond:
      return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

  def delete(self, key):
    with self.cond:
      self.data.pop(key, None)

  def increment(self, key):
    with self.cond:
      self.data[key] = self.data.get(key, 0) + 1
      return self.data[key]


class Killed(Exception):
  pass


@pytest.fixture
def store(monkeypatch):
  s = Store()
  for name in ("put", "get", "try_get", "listing", "delete", "increment"):
    monkeypatch.setattr(kvstore, name, getattr(s, name))
  monkeypatch.setattr(kvstore, "client", lambda: s)
  return s


def test_a_worker_killed_during_its_rejoin_can_exchange_again(store, monkeypatch):
  params = {"w": jnp.zeros(2)}
  out = {}
  master = threading.Thread(target=lambda: out.update(result=async_processes.serve_easgd(
      params, 1, alpha=0.5, timeout_s=20, check_s=30)), daemon=True)
  master.start()
  step = {"w": jnp.ones(2)}

  # incarnation 1 posts its join and is killed before it reads the answer
  real_get = store.get

  def killed_on_join(key, timeout_s):
    if "/joined/" in key:
      time.sleep(0.2)  # the master answers meanwhile; nobody reads it
      raise Killed
    return real_get(key, timeout_s)
  monkeypatch.setattr(kvstore, "get", killed_on_join)
  w1 = async_processes.EASGDWorker(0, 1, timeout_s=3)
  with pytest.raises(Killed):
    w1.rejoin(params)
  w1._beating.set()  # its heartbeat dies with it
  monkeypatch.setattr(kvstore, "get", real_get)

  # incarnation 2 rejoins and exchanges twice
  w2 = async_processes.EASGDWorker(0, 1, timeout_s=3)
  p = w2.rejoin(params)
  for _ in range(2):
    p = w2.apply_updates(p, step)
  w2._beating.set()  # killed (no close)

  # incarnation 3 rejoins: it carries on the master's count and can exchange
  w3 = async_processes.EASGDWorker(0, 1, timeout_s=3)
  p = w3.rejoin(p)
  assert w3.exchanges == 2
  p = w3.apply_updates(p, step)
  w3.close()
  master.join(20)
  center, served, gone = out["result"]
  assert list(served) == [3] and gone == []
  assert not [k for k in store.data if "/joined/" in k]  # no answer left to be taken
  assert np.all(np.asarray(center["w"]) != 0)  # the exchanges moved the center


def test_a_number_taken_by_a_sender_killed_before_writing_is_skipped(store, monkeypatch):
  """A worker killed between taking its arrival number and writing its message leaves a
  hole in the log: the master skips it once later messages are there, and serves them."""
  monkeypatch.setattr(async_serving, "HOLE_S", 0.2)
  params = {"w": jnp.zeros(2)}
  out = {}
  master = threading.Thread(target=lambda: out.update(result=async_processes.serve_easgd(
      params, 1, alpha=0.5, timeout_s=20, check_s=30)), daemon=True)
  master.start()
  kvstore.increment("wagrad/easgd/arrivals")  # a number taken, its message never written
  w = async_processes.EASGDWorker(0, 1, timeout_s=5)
  p = params
  for _ in range(2):
    p = w.apply_updates(p, {"w": jnp.ones(2)})
  w.close()
  master.join(20)
  center, served, gone = out["result"]
  assert list(served) == [2] and gone == []
  assert not [k for k in store.data if "/arrival/" in k]  # every message was taken


def test_a_late_request_of_a_dead_incarnation_is_never_answered_to_the_next(store):
  """A dead incarnation's request for exchange 0 lands after the next incarnation joined
  with count 0 and before its own request 0: the master serves both, each answer under
  the incarnation its request names, and the live one reads its own."""
  params = {"w": jnp.zeros(2)}
  out = {}
  master = threading.Thread(target=lambda: out.update(result=async_processes.serve_easgd(
      params, 1, alpha=0.5, timeout_s=20, check_s=30)), daemon=True)
  master.start()
  w = async_processes.EASGDWorker(0, 1, timeout_s=5)
  p = w.rejoin(params)
  assert w.exchanges == 0
  late = {"w": np.full(2, 100.0, np.float32)}  # the dead one's parameters
  async_serving.post("wagrad/easgd", 0, "0-dead", bulk.encode(late))
  p = w.apply_updates(p, {"w": jnp.ones(2)})
  # the master took the late one first: center 0 -> 50; then this one's x = 0 gives
  # e = 0.5 (0 - 50) = -25, so x + u - e = 26 (the dead one's e = 50 would give -49)
  np.testing.assert_allclose(np.asarray(p["w"]), 26.0)
  w.close()
  master.join(20)
  center, served, gone = out["result"]
  np.testing.assert_allclose(center["w"], 25.0)
  assert list(served) == [1] and gone == []


def test_a_message_is_one_aligned_buffer_that_round_trips_every_dtype():
  """A message's flat buffer is 64-byte aligned (device_put takes it without a copy on
  CPU) and unpacks to the same tree, bit for bit, whatever the leaves' dtypes."""
  tree = {"a": np.arange(7, dtype=np.float32), "b": np.array([[1, -2]], np.int64),
          "c": np.array([0.5, np.nan], np.float16), "d": np.zeros(0, np.float32)}
  flat = bulk._flat(tree)
  assert flat.ctypes.data % 64 == 0 and flat.dtype == np.uint8
  back = bulk._unflat(flat, tree)
  for k in tree:
    assert back[k].dtype == tree[k].dtype and back[k].shape == tree[k].shape
    np.testing.assert_array_equal(back[k].view(np.uint8), tree[k].view(np.uint8))
