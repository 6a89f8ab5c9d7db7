"""Asynchronous EASGD across real processes (wagrad.async_): a master process and three
worker processes over JAX's coordination service, each worker stepping only on its
active steps; under the simulation's serving order the run equals the simulated
``wagrad.async_easgd`` (order="sequential"). Every child is killed (SIGKILL) at a
deadline, so a hang fails the test instead of CI."""
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wagrad

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from async_worker import ETA, STEPS, downpour_pushes, loss, problem  # noqa: E402

DEADLINE = 180


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(n, out, tau, alpha, mode="order", algo="easgd"):
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "async_worker.py"), port,
                             str(n), str(i), out, str(tau), str(alpha), mode, algo],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=DEADLINE)[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f"asynchronous run did not finish within {DEADLINE}s (killed)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  killed = {2} if mode == "kill" else set()  # process 2 = worker 1 kills itself
  assert all((p.returncode == -9) if i in killed else (p.returncode == 0)
             for i, p in enumerate(procs)), "\n".join(o[-2000:] for o in outs)


def _simulated(K, tau, alpha):
  A, b, w0, active = problem(K)
  r = wagrad.Runner("vmap", K)
  tx = wagrad.async_easgd(optax.sgd(ETA), tau, alpha=alpha, order="sequential",
                          axis_name=r.axis_name)
  _, anyx = wagrad.async_easgd_schedule(active, tau)

  def step(p, s, A, b, act, flag):
    u, s = tx.update(jax.grad(loss)(p, A, b), s, p, active=act, any_exchange=flag)
    return wagrad.apply_updates(p, u, s), s
  f = r.map(step)
  p, s = r.replicate({"w": jnp.asarray(w0)}), r.init(tx, {"w": jnp.asarray(w0)})
  for t in range(STEPS):
    p, s = f(p, s, A, b, active[t], wagrad.Shared(jnp.asarray(anyx[t])))
  return np.asarray(p["w"]), np.asarray(wagrad.easgd_center(s)["w"])


def _check_against(out, K, center, x):
  """The master's saved parameters equal ``center`` and worker i's equal ``x[i]``;
  returns the master's and the workers' saved files."""
  master = np.load(f"{out}_master.npz")
  np.testing.assert_allclose(master["center"], center, rtol=1e-5, atol=1e-6)
  workers = [np.load(f"{out}_worker{i}.npz") for i in range(K)]
  for i, w in enumerate(workers):
    np.testing.assert_allclose(w["w"], x[i], rtol=1e-5, atol=1e-6, err_msg=f"worker {i}")
  return master, workers


@pytest.mark.slow
def test_async_easgd_across_processes_equals_the_simulation(tmp_path):
  K, tau, alpha = 3, 2, 0.3
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, alpha)
  x, c = _simulated(K, tau, alpha)
  master, workers = _check_against(out, K, c, x)
  for i, w in enumerate(workers):
    assert int(w["exchanges"]) == int(master["served"][i]) > 0
  assert not np.allclose(x[0], x[1])  # the workers differ: a real test of each one


def np_async_downpour(K, tau, mu):
  """NumPy: the workers' active steps taken in the serving order (by step, then worker
  index); a push adds the worker's accumulated updates to the master through the
  momentum m <- mu m + Delta and the worker takes the master's parameters."""
  A, b, w0, active = problem(K)
  x = np.repeat(w0[None].astype(np.float64), K, 0)
  xm, m, acc = w0.astype(np.float64), np.zeros(3), np.zeros((K, 3))
  push = downpour_pushes(active, tau)
  for t in range(STEPS):
    for i in range(K):
      if not active[t, i]:
        continue
      u = -ETA * 2.0 * A[i].T.astype(np.float64) @ (A[i] @ x[i] - b[i]) / A[i].shape[0]
      acc[i] += u
      x[i] = x[i] + u
      if push[t, i]:
        m = mu * m + acc[i] if mu else acc[i]
        xm = xm + m
        x[i], acc[i] = xm, 0.0
  return x, xm, push.sum(0)


@pytest.mark.slow
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_async_downpour_across_processes_equals_numpy(tmp_path, mu):
  K, tau = 3, 2
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, mu, algo="downpour")
  x, xm, pushes = np_async_downpour(K, tau, mu)
  master, _ = _check_against(out, K, xm, x)
  assert list(master["served"]) == list(pushes) and min(pushes) > 0
  assert not np.allclose(x[0], x[1])


def np_softsync(K, n, alpha0):
  """NumPy n-softsync: pushes served by step, then learner index; a gradient's staleness
  is the server's version minus the version its parameters came from."""
  A, b, w0, active = problem(K)
  c = K // n
  theta, V, buf = w0.astype(np.float64), 0, []
  x, v = np.repeat(theta[None], K, 0), np.zeros(K, int)
  for t in range(STEPS):
    for i in range(K):
      if not active[t, i]:
        continue
      g = 2.0 * A[i].T.astype(np.float64) @ (A[i] @ x[i] - b[i]) / A[i].shape[0]
      buf.append(alpha0 / max(V - v[i], 1) * g)
      if len(buf) == c:
        theta, V, buf = theta - sum(buf) / c, V + 1, []
      x[i], v[i] = theta, V
  return x, theta


@pytest.mark.slow
def test_async_softsync_across_processes_equals_numpy(tmp_path):
  """3 learners, 3-softsync (an update per gradient, staleness up to 2) with alpha0 / tau."""
  K, n, alpha0 = 3, 3, 0.1
  out = str(tmp_path / "run")
  _run(K + 1, out, n, alpha0, algo="softsync")
  x, theta = np_softsync(K, n, alpha0)
  _check_against(out, K, theta, x)
  plain = np_softsync(K, n, alpha0 * 1e-9)[1]  # the test can tell an update from none
  assert not np.allclose(plain, theta)


@pytest.mark.slow
def test_a_killed_worker_stops_no_one(tmp_path):
  """Worker 1 is killed (SIGKILL) after its first exchange: the master finds it gone,
  keeps serving the others to the end and keeps every exchange it served."""
  K, tau, alpha = 3, 2, 0.3
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, alpha, mode="kill")
  master = np.load(f"{out}_master.npz")
  assert list(master["gone"]) == [1]
  assert int(master["served"][1]) == 1                      # its one exchange is kept
  for i in (0, 2):
    w = np.load(f"{out}_worker{i}.npz")
    assert int(w["exchanges"]) == int(master["served"][i]) > 1
    assert np.isfinite(w["w"]).all()
  assert np.isfinite(master["center"]).all()


def test_bad_arguments_and_a_missing_runtime_are_named():
  """Checked in this process, no distributed runtime: each error names its fix."""
  from wagrad import async_
  with pytest.raises(ValueError, match="sync_period"):
    async_.EASGDWorker(0, 0)
  with pytest.raises(ValueError, match="worker"):
    async_.EASGDWorker(-1, 2)
  with pytest.raises(ValueError, match="alpha"):
    async_.serve_easgd({"w": np.zeros(2)}, 2, alpha=1.5)
  with pytest.raises(ValueError, match="momentum"):
    async_.serve_downpour({"w": np.zeros(2)}, 2, momentum=1.0)
  with pytest.raises(ValueError, match="sync_period"):
    async_.DownpourWorker(0, 1.5)
  with pytest.raises(ValueError, match="dividing"):
    async_.serve_softsync({"w": np.zeros(2)}, 4, 3, alpha0=0.1)
  with pytest.raises(ValueError, match="modulation"):
    async_.serve_softsync({"w": np.zeros(2)}, 4, 2, alpha0=0.1, modulation="sqrt")
  worker = async_.EASGDWorker(0, 2)  # the first step exchanges: it needs the store
  with pytest.raises(RuntimeError, match="initialize_distributed"):
    worker.apply_updates({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
