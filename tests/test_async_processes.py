"""Asynchronous EASGD across real processes (wagrad.async_): a master process and three
worker processes over JAX's coordination service, each worker stepping only on its
active steps; under the simulation's serving order the run equals the simulated
``wagrad.async_easgd`` (order="sequential"). Every child is killed (SIGKILL) at a
deadline, so a hang fails the test instead of CI."""
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wagrad
from wagrad._src import async_processes, async_ranked

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from async_worker import (ETA, STEPS, downpour_pushes, loss, one_at_a_time,  # noqa: E402
                          problem)

DEADLINE = 180


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(port, n, i, out, tau, alpha, mode, algo, servers=1, env=None):
  return subprocess.Popen([sys.executable, os.path.join(HERE, "async_worker.py"), port,
                           str(n), str(i), out, str(tau), str(alpha), mode, algo,
                           str(servers)], env=None if env is None else {**os.environ, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, killed=()):
  """Wait for every process (SIGKILL at the deadline); process ``i in killed`` must have
  been killed, the others must have exited cleanly."""
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
  assert all((p.returncode == -9) if i in killed else (p.returncode == 0)
             for i, p in enumerate(procs)), "\n".join(o[-2000:] for o in outs)


def _run(n, out, tau, alpha, mode="order", algo="easgd", servers=1):
  port = str(_free_port())
  procs = [_spawn(port, n, i, out, tau, alpha, mode, algo, servers) for i in range(n)]
  _finish(procs, {2} if mode == "kill" else set())  # process 2 = worker 1 kills itself


def _simulate(K, make_tx, rows, value=False):
  """A simulated transform on vmap over the test problem, one step per row of extra
  ``update`` arguments (per-worker ``[K]`` arrays or ``wagrad.Shared``); ``value``: pass
  the loss. Returns ``(runner, params, state)``."""
  A, b, w0, _ = problem(K)
  r = wagrad.Runner("vmap", K)
  tx = make_tx(r.axis_name)

  def step(p, s, A, b, extra):
    v, g = jax.value_and_grad(loss)(p, A, b)
    u, s = tx.update(g, s, p, **({"value": v} if value else {}), **extra)
    return wagrad.apply_updates(p, u, s), s
  f = r.map(step)
  p, s = r.replicate({"w": jnp.asarray(w0)}), r.init(tx, {"w": jnp.asarray(w0)})
  for extra in rows:
    p, s = f(p, s, A, b, extra)
  return r, p, s


def _simulated(K, tau, alpha):
  active = problem(K)[3]
  _, anyx = wagrad.schedules.async_easgd_schedule(active, tau)
  _, p, s = _simulate(K, lambda ax: wagrad.async_easgd(
      optax.sgd(ETA), tau, alpha=alpha, order="sequential", axis_name=ax),
      [{"active": active[t], "any_exchange": wagrad.Shared(jnp.asarray(anyx[t]))}
       for t in range(STEPS)])
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
  """NumPy: the workers' active steps (one worker at a time) taken in the serving order;
  a push adds the worker's accumulated updates to the master through the momentum
  m <- mu m + Delta and the worker takes the master's parameters."""
  A, b, w0, _ = problem(K)
  active = one_at_a_time(K)
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


def _simulated_downpour(K, tau, mu):
  """wagrad.downpour(asynchronous=True) on vmap, one worker stepping at each step."""
  _, p, s = _simulate(K, lambda ax: wagrad.downpour(
      ETA, tau, master_momentum=mu, asynchronous=True, axis_name=ax),
      [{"active": a} for a in one_at_a_time(K)])
  return np.asarray(p["w"]), np.asarray(wagrad.easgd_center(s)["w"])


@pytest.mark.slow
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_async_downpour_across_processes_equals_numpy_and_the_simulation(tmp_path, mu):
  K, tau = 3, 2
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, mu, algo="downpour")
  x, xm, pushes = np_async_downpour(K, tau, mu)
  master, _ = _check_against(out, K, xm, x)
  assert list(master["served"]) == list(pushes) and min(pushes) > 0
  assert not np.allclose(x[0], x[1])
  _check_against(out, K, *reversed(_simulated_downpour(K, tau, mu)))


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


def _simulated_softsync(K, alpha0):
  """wagrad.staleness_aware_sgd on vmap, one push per server update (c = 1) in the
  process run's serving order (by step, then learner index)."""
  active = problem(K)[3]
  _, p, s = _simulate(K, lambda ax: wagrad.staleness_aware_sgd(
      optax.sgd(1.0), alpha0=alpha0, axis_name=ax),
      [{"push": np.arange(K) == i, "apply": wagrad.Shared(jnp.bool_(True))}
       for t in range(STEPS) for i in range(K) if active[t, i]])
  return np.asarray(p["w"]), np.asarray(wagrad._src.base.find_shared(s, "server").server["w"])


@pytest.mark.slow
def test_async_softsync_across_processes_equals_numpy_and_the_simulation(tmp_path):
  """3 learners, 3-softsync (an update per gradient, staleness up to 2) with alpha0 / tau:
  equal to a NumPy reference and to the simulated staleness_aware_sgd."""
  K, n, alpha0 = 3, 3, 0.1
  out = str(tmp_path / "run")
  _run(K + 1, out, n, alpha0, algo="softsync")
  x, theta = np_softsync(K, n, alpha0)
  _check_against(out, K, theta, x)
  x_sim, theta_sim = _simulated_softsync(K, alpha0)
  _check_against(out, K, theta_sim, x_sim)
  plain = np_softsync(K, n, alpha0 * 1e-9)[1]  # the test can tell an update from none
  assert not np.allclose(plain, theta)


def _simulated_lsgd(K, tau, pull):
  """wagrad.async_lsgd on vmap, one worker stepping at each step."""
  _, p, s = _simulate(K, lambda ax: wagrad.async_lsgd(optax.sgd(ETA), tau, pull=pull,
                                                      axis_name=ax),
                      [{"active": a} for a in one_at_a_time(K)], value=True)
  sh = wagrad._src.base.find_shared(s, "leader_params")
  return np.asarray(p["w"]), np.asarray(sh.leader_params["w"]), int(sh.num_replacements)


@pytest.mark.slow
def test_async_lsgd_across_processes_equals_the_simulation(tmp_path):
  """Reports served one at a time in the simulation's order: every worker and the
  master's leader equal wagrad.async_lsgd's."""
  K, tau, pull = 3, 2, 0.5
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, pull, algo="lsgd")
  x, leader, replaced = _simulated_lsgd(K, tau, pull)
  master, _ = _check_against(out, K, leader, x)
  reports = downpour_pushes(one_at_a_time(K), tau)
  assert list(master["served"]) == list(reports.sum(0)) and reports.sum(0).min() > 0
  assert replaced >= 2 and not np.allclose(x[0], x[1])  # the leader moved between workers


def _simulated_wpsgd(K):
  """wagrad.wpsgd (one-shot, "samples") on vmap over the speed schedule, then combined."""
  active = problem(K)[3]
  r, p, s = _simulate(K, lambda ax: wagrad.wpsgd(optax.sgd(ETA), weighting="samples",
                                                 axis_name=ax),
                      [{"active": a} for a in active])
  combined = r.map(lambda p, s: wagrad.wpsgd_combine(p, s, r.axis_name).value)(p, s)
  return np.asarray(combined["w"]), active.sum(0)


@pytest.mark.slow
def test_async_wpsgd_across_processes_equals_the_simulation(tmp_path):
  """Each worker steps at its own speed, then the master weights the models by their
  step counts: every worker gets wagrad.wpsgd_combine's model."""
  K = 3
  out = str(tmp_path / "run")
  _run(K + 1, out, 1, 0.0, algo="wpsgd")
  combined, steps = _simulated_wpsgd(K)
  master, _ = _check_against(out, K, combined[0], combined)
  assert list(master["served"]) == list(steps) and len(set(steps)) > 1  # unequal loads
  assert not np.allclose(async_ranked.wpsgd_scores(steps), 1.0)


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


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["easgd", "downpour"])
def test_a_master_sharded_over_two_servers_equals_one(tmp_path, algo):
  """S = 2 server processes, each keeping a slice of the parameters (2 and 1 of the 3
  values), serve in the forced order: the joined center and every worker equal the
  one-master rule (the simulation for EASGD, NumPy for DOWNPOUR)."""
  K, tau, alpha = 3, 2, (0.3 if algo == "easgd" else 0.5)
  out = str(tmp_path / "run")
  _run(K + 2, out, tau, alpha, algo=algo, servers=2)
  parts = [np.load(f"{out}_s{s}_master.npz") for s in range(2)]
  assert [p["center"].size for p in parts] == [2, 1]
  x, center = (_simulated(K, tau, alpha) if algo == "easgd"
               else np_async_downpour(K, tau, alpha)[:2])
  np.testing.assert_allclose(np.concatenate([p["center"] for p in parts]), center,
                             rtol=1e-5, atol=1e-6)
  for i in range(K):
    w = np.load(f"{out}_worker{i}.npz")
    np.testing.assert_allclose(w["w"], x[i], rtol=1e-5, atol=1e-6, err_msg=f"worker {i}")
    assert int(w["exchanges"]) == int(parts[0]["served"][i]) == int(parts[1]["served"][i])


@pytest.mark.slow
def test_a_worker_gone_non_finite_is_left_out_and_takes_the_center(tmp_path):
  """Worker 1's parameters turn NaN before an exchange step: the master's center never
  takes them, and the worker continues from the center (finite at the end), its
  exchange count still the master's."""
  K, tau, alpha = 3, 2, 0.3
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, alpha, mode="nan")
  master = np.load(f"{out}_master.npz")
  assert list(master["gone"]) == []
  assert np.isfinite(master["centers"]).all()
  for i in range(K):
    w = np.load(f"{out}_worker{i}.npz")
    assert np.isfinite(w["w"]).all(), i
    assert int(w["exchanges"]) == int(master["served"][i]) > 0


def test_the_master_takes_easgd_s_exchange_and_leaves_non_finite_out():
  """The master's rule is EASGD's exchange with one worker: e = alpha (x - c),
  c <- c + e (NumPy reference); a non-finite x changes nothing."""
  rng = np.random.default_rng(0)
  c = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.ones(2, np.float32)}
  x = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
  new, e = async_processes.master_exchange(c, x, 0.3)
  for k in c:
    np.testing.assert_allclose(e[k], 0.3 * (x[k] - c[k]), rtol=1e-6)
    np.testing.assert_allclose(new[k], c[k] + 0.3 * (x[k] - c[k]), rtol=1e-6)
  x["w"][1, 0] = np.inf
  new, e = async_processes.master_exchange(c, x, 0.3)
  for k in c:
    np.testing.assert_array_equal(new[k], c[k])
    np.testing.assert_array_equal(e[k], 0.0)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_the_downpour_master_takes_downpour_s_step_and_leaves_non_finite_out(mu):
  """DOWNPOUR's master for one push is its own master step with one worker:
  m <- mu m + Delta, x_M <- x_M + m (NumPy reference); a non-finite push is left out."""
  rng = np.random.default_rng(1)
  x = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  m = None if mu == 0 else {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  d = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  (x1, m1), ans = async_processes.master_push((x, m), d, mu)
  step = d["w"] if mu == 0 else mu * m["w"] + d["w"]
  np.testing.assert_allclose(x1["w"], x["w"] + step, rtol=1e-6)
  np.testing.assert_array_equal(ans["w"], x1["w"])
  if mu:
    np.testing.assert_allclose(m1["w"], step, rtol=1e-6)
  d["w"][0, 1] = np.nan
  (x2, _), _ = async_processes.master_push((x1, m1), d, mu)
  np.testing.assert_allclose(x2["w"], x1["w"] + (0 if mu == 0 else mu * m1["w"]), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slow", "late"])
def test_a_slow_or_late_worker_is_not_taken_for_dead(tmp_path, mode):
  """Worker 2 pauses longer than the master's check_s while the others finish (its
  heartbeat keeps it alive), or starts that late (a worker not heard from yet has
  timeout_s to start): every exchange is served, no one is taken for dead."""
  K, tau, alpha = 3, 2, 0.3
  out = str(tmp_path / "run")
  _run(K + 1, out, tau, alpha, mode=mode)
  master = np.load(f"{out}_master.npz")
  assert list(master["gone"]) == []
  exch, _ = wagrad.schedules.async_easgd_schedule(problem(K)[3], tau)
  assert list(master["served"]) == list(exch.sum(0))


@pytest.mark.slow
def test_a_restarted_worker_rejoins_from_the_center(tmp_path):
  """Worker 1 is killed after its first exchange and started again: it rejoins from the
  master's center of that moment, its exchange count carries on, and the master ends
  with it among the live workers."""
  K, tau, alpha = 3, 2, 0.3
  out, port = str(tmp_path / "run"), str(_free_port())
  procs = [_spawn(port, K + 1, i, out, tau, alpha, "rejoin", "easgd") for i in range(K + 1)]
  try:
    procs[2].wait(timeout=DEADLINE)
  except subprocess.TimeoutExpired:
    pass  # _finish kills and reports it
  procs.append(_spawn(port, K + 1, 2, out, tau, alpha, "rejoined", "easgd"))
  _finish(procs, {2})
  master, joined = np.load(f"{out}_master.npz"), np.load(f"{out}_joined.npz")
  assert int(joined["exchanges"]) == 1                  # the first life's one exchange
  assert min(np.abs(c - joined["w"]).max() for c in master["centers"]) < 1e-6
  assert not np.allclose(joined["w"], master["centers"][0])  # a center that had moved
  assert list(master["gone"]) == []
  w1 = np.load(f"{out}_worker1.npz")
  assert int(w1["exchanges"]) == int(master["served"][1]) > 1


@pytest.mark.slow
def test_workers_killed_anywhere_and_restarted_carry_their_counts_exactly(tmp_path):
  """Chaos: workers 0 and 1 are killed (SIGKILL) at seeded points of their store calls
  (inside a join, a request, the wait for an answer), three times each, and restarted
  at once; every restart rejoins. At the end every worker's count is the master's, each
  exchange the master served moved one worker's count by one (none served twice or
  lost), and the center is finite."""
  K, tau, alpha = 3, 2, 0.3
  out, port = str(tmp_path / "run"), str(_free_port())
  start = lambda i, j: _spawn(port, K + 1, i, out, tau, alpha, "chaos", "easgd",  # noqa: E731
                              env={"WAGRAD_TEST_INCARNATION": str(j)})
  master = start(0, 0)
  workers = {i: start(i + 1, 0) for i in range(K)}
  incarnation, killed, outs = dict.fromkeys(range(K), 0), 0, []
  deadline = time.monotonic() + DEADLINE
  try:
    while workers:
      assert time.monotonic() < deadline, "chaos run past its deadline"
      for i, proc in list(workers.items()):
        if proc.poll() is None:
          continue
        outs.append(proc.stdout.read())
        if proc.returncode == -9:  # killed: restart it
          killed, incarnation[i] = killed + 1, incarnation[i] + 1
          workers[i] = start(i + 1, incarnation[i])
        else:
          assert proc.returncode == 0, outs[-1][-2000:]
          del workers[i]
      time.sleep(0.05)
    outs.append(master.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    assert master.returncode == 0, outs[-1][-2000:]
  finally:
    for proc in [master, *workers.values()]:
      if proc.poll() is None:
        proc.kill()
  assert killed == 6 and incarnation[2] == 0
  m = np.load(f"{out}_master.npz")
  assert list(m["gone"]) == []
  for i in range(K):
    assert int(np.load(f"{out}_worker{i}.npz")["exchanges"]) == int(m["served"][i])
  steps = np.diff(np.concatenate([np.zeros((1, K), int), m["served_log"]]), axis=0)
  assert (steps.sum(1) == 1).all() and (steps >= 0).all()
  assert np.isfinite(m["center"]).all()


@pytest.mark.slow
def test_a_restarted_master_resumes_from_its_checkpoint(tmp_path):
  """The master checkpoints (orbax) after every exchange and is killed after the fifth;
  the test kills the workers (process 0 hosted JAX's coordination service) and starts
  the job again: the master resumes from the checkpoint, every worker rejoins from the
  center of the fifth exchange with its own count, and the counts carry on."""
  K, tau, alpha = 3, 2, 0.3
  out = str(tmp_path / "run")
  port = str(_free_port())
  first = [_spawn(port, K + 1, i, out, tau, alpha, "ckpt", "easgd") for i in range(K + 1)]
  try:
    first[0].wait(timeout=DEADLINE)
  finally:
    for p in first:
      p.kill()
      p.wait()
  assert first[0].returncode == -9, first[0].communicate()[0][-2000:]
  before = np.load(f"{out}_ckpt_master.npz")
  port = str(_free_port())
  _finish([_spawn(port, K + 1, i, out, tau, alpha, "resume", "easgd") for i in range(K + 1)])
  master = np.load(f"{out}_master.npz")
  for i in range(K):
    joined = np.load(f"{out}_joined{i}.npz")
    np.testing.assert_array_equal(joined["w"], before["center"])
    assert int(joined["exchanges"]) == int(before["served"][i])
    w = np.load(f"{out}_worker{i}.npz")
    assert int(w["exchanges"]) == int(master["served"][i]) > int(before["served"][i])
  assert int(before["served"].sum()) == 5


def test_softsync_server_state_survives_its_checkpoint_form():
  """The softsync server's buffer (a list of up to c - 1 gradients) is saved padded to c
  rows with its length; the round trip gives back the same state."""
  from wagrad._src import async_softsync as ap
  theta = {"w": np.arange(3, dtype=np.float32)}
  for n in (0, 2):
    buf = [{"w": np.full(3, j + 1.0, np.float32)} for j in range(n)]
    back = ap._softsync_state(ap._softsync_saved((theta, (7, buf)), theta, 3))
    assert back[1][0] == 7 and len(back[1][1]) == n
    for a, b in zip(back[1][1], buf):
      np.testing.assert_array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(back[0]["w"], theta["w"])


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
  with pytest.raises(ValueError, match="pull"):
    async_.LSGDWorker(0, 2, pull=0.0)
  with pytest.raises(ValueError, match="avg_size"):
    async_.LSGDWorker(0, 2, avg_size=0)
  with pytest.raises(ValueError, match="budget_s"):
    async_.WPSGDWorker(0, budget_s=0)
  with pytest.raises(ValueError, match="contraction"):
    async_.serve_wpsgd({"w": np.zeros(2)}, 2, weighting="contraction")
  with pytest.raises(ValueError, match="checkpoint_every"):
    async_.serve_easgd({"w": np.zeros(2)}, 2, alpha=0.5, checkpoint_dir="unused",
                       checkpoint_every=0)
  with pytest.raises(ValueError, match="no worker has weight"):
    async_ranked.master_wpsgd([{"w": np.zeros(2)}], [0])
  with pytest.raises(ValueError, match="num_servers"):
    async_.EASGDWorker(0, 2, num_servers=0)
  with pytest.raises(ValueError, match=r"`server` must be an integer in \[0, num_servers=2\)"):
    async_.serve_easgd({"w": np.zeros(2)}, 2, alpha=0.5, server=2, num_servers=2)
  with pytest.raises(ValueError, match="num_servers"):
    async_.serve_downpour({"w": np.zeros(2)}, 2, num_servers=0)
  with pytest.warns(DeprecationWarning, match="poll_s"):  # it would do nothing
    with pytest.raises(RuntimeError, match="initialize_distributed"):
      async_.serve_easgd({"w": np.zeros(2)}, 2, alpha=0.5, poll_s=0.001)
  worker = async_.EASGDWorker(0, 2)  # the first step exchanges: it needs the store
  with pytest.raises(RuntimeError, match="initialize_distributed"):
    worker.apply_updates({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})


def test_lsgd_master_keeps_the_best_finite_report_and_wpsgd_weights_by_steps():
  """The masters' rules alone (NumPy): a worse or non-finite report leaves the leader;
  WP-SGD's combination weights by step counts and drops a non-finite model."""
  L0 = {"w": np.zeros(2, np.float32)}
  st, ans = async_ranked.master_lsgd((L0, (np.inf, -1)), ({"w": np.ones(2, np.float32)}, 0.5, 1))
  assert st[1] == (0.5, 1) and np.all(ans["w"] == 1)
  for report in (({"w": np.full(2, 2.0, np.float32)}, 0.7, 2),        # worse loss
                 ({"w": np.array([np.nan, 0], np.float32)}, 0.1, 0),   # non-finite params
                 ({"w": np.full(2, 3.0, np.float32)}, np.nan, 2)):     # non-finite loss
    st, ans = async_ranked.master_lsgd(st, report)
    assert st[1] == (0.5, 1) and np.all(ans["w"] == 1)
  models = [{"w": np.zeros(2, np.float32)}, {"w": np.full(2, 4.0, np.float32)},
            {"w": np.full(2, np.inf, np.float32)}]
  out = async_ranked.master_wpsgd(models, [1, 3, 5])
  np.testing.assert_allclose(out["w"], 3.0)          # (1*0 + 3*4) / 4; the inf one dropped
  assert out["w"].dtype == np.float32
  np.testing.assert_allclose(async_ranked.master_wpsgd(models[:2], [1, 3], weighting="uniform")["w"], 2.0)
