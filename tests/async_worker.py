"""One process of the asynchronous multi-process tests (tests/test_async_processes.py).

argv: port, number of processes, process id, output prefix, sync period, alpha (EASGD;
DOWNPOUR: the master's momentum; softsync: alpha0; LSGD: the pull), mode, algorithm
("easgd", "downpour", "softsync", whose n is given as the sync period, "lsgd", or
"wpsgd", "samples" weighting); DOWNPOUR's and LSGD's workers step one at a time.
Process 0 is the master; process i >= 1 is worker i - 1, stepping on the active steps
of a seeded speed schedule. Mode "order": the master serves in the simulation's order
(by step, then worker index). Mode "kill": the master serves what arrives, and worker 1
kills itself (SIGKILL) at its third step. Mode "rejoin": as "kill", and the test starts
worker 1 again in mode "rejoined": it rejoins from the master's center, then runs its
steps; worker 0 closes only after that join. Mode "slow": worker 2 pauses 4 s (longer
than the master's check_s) before its last step, alive all the while; mode "late": worker
2 starts 4 s late; mode "nan": worker 1's parameters turn NaN before its third step. Mode "ckpt": the
master checkpoints after every exchange and kills itself after the fifth; mode "resume":
a new job whose master resumes from that checkpoint and whose workers rejoin (all
joins before any step). Mode "chaos": workers 0 and 1 are killed at seeded points of
their store calls, several times each (:func:`_chaos`), and the test restarts them; each
incarnation after the first rejoins. An optional 9th argument S > 1 (EASGD, DOWNPOUR): processes
0..S-1 are the servers of a sharded master (server s saves under "<out>_s<s>"), the
workers are processes S.. .
"""
import os
import signal
import sys
import threading
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import wagrad  # noqa: E402
from wagrad import async_  # noqa: E402
from wagrad._src import kvstore  # noqa: E402

STEPS, ETA = 12, 0.05


def problem(K):
  rng = np.random.default_rng(0)
  A = rng.normal(size=(K, 6, 3)).astype(np.float32)
  b = rng.normal(size=(K, 6)).astype(np.float32)
  w0 = rng.normal(size=3).astype(np.float32)
  active = wagrad.schedules.speed_schedule(K, STEPS, wagrad.schedules.straggler_speeds(K, 0.5, 2.0), seed=1)
  return A, b, w0, active


def one_at_a_time(K):
  """[t, i]: one worker steps at each step, drawn with probabilities 1/2, 1/3, 1/6, ..."""
  p = np.array([1 / 2, 1 / 3, 1 / 6])[:K]
  who = np.random.default_rng(6).choice(K, size=STEPS, p=p / p.sum())
  return np.arange(K)[None] == who[:, None]


def downpour_pushes(active, tau):
  """[t, i]: worker i pushes at step t (after every tau-th of its own active steps)."""
  own = np.cumsum(active, 0)
  return active & (own % tau == 0)


def loss(p, A, b):
  return jax.numpy.mean((A @ p["w"] - b) ** 2)


def _chaos(i, kills=3):
  """Mode "chaos": incarnation j (env WAGRAD_TEST_INCARNATION) of workers 0 and 1, for
  j < ``kills``, is killed (SIGKILL) at a seeded call to the store (before or after
  it: inside a join, a request or the wait for its answer); the test restarts it."""
  j = int(os.environ.get("WAGRAD_TEST_INCARNATION", "0"))
  state = {"incarnation": j, "armed": i in (0, 1) and j < kills, "calls": 0}
  rng = np.random.default_rng([i, j, 7])
  at, before = int(rng.integers(1, 16)), bool(rng.random() < 0.5)

  def hooked(fn):
    def call(*args, **kwargs):
      if not (state["armed"] and threading.current_thread() is threading.main_thread()):
        return fn(*args, **kwargs)  # the heartbeat thread is left alone
      state["calls"] += 1
      if state["calls"] == at and before:
        os.kill(os.getpid(), signal.SIGKILL)
      out = fn(*args, **kwargs)
      if state["calls"] == at:
        os.kill(os.getpid(), signal.SIGKILL)
      return out
    return call
  for name in ("put", "get", "increment", "delete"):
    setattr(kvstore, name, hooked(getattr(kvstore, name)))
  return state


def main():
  port, n, pid, out, tau, alpha, mode = sys.argv[1:8]
  algo = sys.argv[8] if len(sys.argv) > 8 else "easgd"
  S = int(sys.argv[9]) if len(sys.argv) > 9 else 1  # server processes (sharded master)
  n, pid, tau, alpha = int(n), int(pid), int(tau), float(alpha)
  jax.config.update("jax_enable_recoverability", True)  # a killed worker stops no one
  wagrad.initialize_distributed(f"127.0.0.1:{port}", n, pid, timeout_seconds=60,
                                heartbeat_timeout_seconds=3)
  K = n - S
  A, b, w0, active = problem(K)
  p = {"w": w0}
  if algo in ("lsgd", "downpour"):
    active = one_at_a_time(K)
  shards = {} if S == 1 else {"server": pid, "num_servers": S}
  if pid < S:
    out = out if S == 1 else f"{out}_s{pid}"
    if algo == "wpsgd":
      center, served, gone = async_.serve_wpsgd(p, K, timeout_s=60, check_s=3.0)
    elif algo == "lsgd":
      exch = downpour_pushes(active, tau)
      order = [i for t in range(STEPS) for i in range(K) if exch[t, i]]
      center, served, gone = async_.serve_lsgd(
          p, K, order=order if mode == "order" else None, timeout_s=60, check_s=3.0)
    elif algo == "softsync":
      order = [i for t in range(STEPS) for i in range(K) if active[t, i]]
      center, served, gone = async_.serve_softsync(
          p, K, tau, alpha0=alpha, order=order if mode == "order" else None, timeout_s=60,
          check_s=3.0)
    elif algo == "downpour":
      exch = downpour_pushes(active, tau)
      order = [i for t in range(STEPS) for i in range(K) if exch[t, i]]
      center, served, gone = async_.serve_downpour(
          p, K, momentum=alpha, order=order if mode == "order" else None, timeout_s=60,
          check_s=3.0, **shards)
    else:
      exch, _ = wagrad.schedules.async_easgd_schedule(active, tau)
      order = [i for t in range(STEPS) for i in range(K) if exch[t, i]]
      centers = [w0 if S == 1 else np.array_split(w0, S)[pid]]
      served_log = []

      def callback(c, served):
        centers.append(np.array(c["w"]))
        served_log.append(np.array(served))
        if mode == "ckpt" and served.sum() == 5:
          np.savez(f"{out}_ckpt_master.npz", center=c["w"], served=served)
          os.kill(os.getpid(), signal.SIGKILL)
      center, served, gone = async_.serve_easgd(
          p, K, alpha=alpha, order=order if mode == "order" else None, timeout_s=60,
          check_s=60.0 if mode == "chaos" else 3.0, callback=callback, checkpoint_every=1,
          checkpoint_dir=f"{out}_ckpt" if mode in ("ckpt", "resume") else None, **shards)
    np.savez(f"{out}_master.npz", center=center["w"], served=served, gone=np.array(gone),
             centers=np.array(centers if algo == "easgd" else []),
             served_log=np.array(served_log if algo == "easgd" else []))
    return
  i = pid - S
  if algo == "softsync":
    learner = async_.SoftsyncLearner(i, timeout_s=60)
    grad = jax.jit(jax.grad(loss))
    for t in range(STEPS):
      if active[t, i]:
        p = learner.push_pull(p, grad(p, A[i], b[i]))
    learner.close()
    np.savez(f"{out}_worker{i}.npz", w=np.asarray(p["w"]), exchanges=learner.exchanges)
    return
  if algo == "wpsgd":
    worker = async_.WPSGDWorker(i, timeout_s=60)
  elif algo == "lsgd":
    worker = async_.LSGDWorker(i, tau, pull=alpha, timeout_s=60)
  else:
    if mode == "late" and i == 2:
      time.sleep(4.0)  # still starting (data, compilation): no heartbeat yet
    make = async_.DownpourWorker if algo == "downpour" else async_.EASGDWorker
    worker = make(i, tau, timeout_s=60, num_servers=S)
  chaos = _chaos(i) if mode == "chaos" else None
  if mode in ("rejoined", "resume") or (chaos and chaos["incarnation"] > 0):
    p = worker.rejoin(p)
    name = "joined" if mode == "rejoined" else f"joined{i}"
    np.savez(f"{out}_{name}.npz", w=np.asarray(p["w"]), exchanges=worker.exchanges)
    kvstore.put("test/rejoined" if mode == "rejoined" else f"test/joined/{i}", b"1")
  if mode == "resume":  # every worker has joined before anyone steps
    for j in range(K):
      kvstore.get(f"test/joined/{j}", 60)
  sgd = optax.sgd(ETA)
  s = sgd.init(p)
  grad = jax.jit(jax.value_and_grad(loss))
  for t in range(STEPS):
    if mode in ("kill", "rejoin") and i == 1 and worker.clock == 2:
      os.kill(os.getpid(), signal.SIGKILL)
    if mode == "nan" and i == 1 and worker.clock == 2:
      p = {"w": jax.numpy.full_like(p["w"], jax.numpy.nan)}  # its parameters blow up
    if mode == "slow" and i == 2 and t == STEPS - 1:
      time.sleep(4.0)
    if active[t, i]:
      value, g = grad(p, A[i], b[i])
      u, s = sgd.update(g, s, p)
      p = worker.apply_updates(p, u, value) if algo == "lsgd" else worker.apply_updates(p, u)
  if algo == "wpsgd":
    p = worker.combine(p)
  if mode == "rejoin" and i == 0:
    kvstore.get("test/rejoined", 60)  # keep the master serving until worker 1 is back
  if chaos:
    chaos["armed"] = False  # a close is the last message: the master may leave after it
  worker.close()
  np.savez(f"{out}_worker{i}.npz", w=np.asarray(p["w"]), exchanges=worker.exchanges)


if __name__ == "__main__":
  main()
