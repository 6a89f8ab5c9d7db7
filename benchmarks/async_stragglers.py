"""Asynchronous algorithms across processes against the same rule in lockstep, one
straggler.

3 worker processes on this machine (one CPU device each, loopback), scikit-learn's
digits split over the workers, an MLP 64 -> 64 -> 10, inner SGD 0.1, 32 examples per
step, tau = 4 (EASGD alpha = 0.3, LSGD pull = 0.1). Every step costs ``--step-ms`` (a
sleep standing for the compute of a larger model); worker 0 is ``--slow``x slower.
For each algorithm (``--algos``), two variants:

* ``async``: ``wagrad.async_`` -- process 0 is the master (it evaluates its model every
  4 exchanges), processes 1..3 the workers, each at its own pace;
* ``lockstep``: the synchronous transform on ``Runner("shard_map", 3)`` across the 3
  processes (``jax.distributed``, gloo), every step waiting for the slowest worker;
  every 4 steps ``wagrad.evaluated_params`` (its time is not counted).

Pairs: ``easgd`` / ``easgd``, ``downpour`` / ``downpour``, ``lsgd`` / ``lsgd``,
``softsync`` (fully asynchronous, alpha0 / staleness) / ``sync_sgd``, and ``wpsgd`` in
the wall-clock budget of ``--steps`` fast steps: asynchronous workers each step at their
own speed, then the combination weighted by steps; in lockstep ``--steps / --slow``
steps (every one at the slow worker's pace), then the combination.

Every worker runs ``--steps`` of its own steps. Reported: the evaluated model's test
accuracy against wall-clock seconds (from a barrier after compilation) and the time to
reach ``--target``; in ``results/async_stragglers.json`` and ``.png``.

    python benchmarks/async_stragglers.py
    python benchmarks/async_stragglers.py --algos easgd,lsgd --steps 200
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

K, TAU, ALPHA, LR, BATCH, HIDDEN = 3, 4, 0.3, 0.1, 32, 64


def data():
  from sklearn.datasets import load_digits
  X, y = load_digits(return_X_y=True)
  X = (X / 16.0).astype(np.float32)
  idx = np.random.default_rng(0).permutation(len(X))
  X, y = X[idx], y[idx].astype(np.int32)
  (Xtr, ytr), (Xte, yte) = (X[:1400], y[:1400]), (X[1400:], y[1400:])
  n = len(Xtr) // K
  return Xtr[:n * K].reshape(K, n, 64), ytr[:n * K].reshape(K, n), Xte, yte


def init_params():
  rng = np.random.default_rng(0)
  return {"w0": (rng.normal(size=(64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
          "b0": np.zeros(HIDDEN, np.float32),
          "w1": (rng.normal(size=(HIDDEN, 10)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
          "b1": np.zeros(10, np.float32)}


def accuracy(p, X, y):
  h = np.maximum(X @ np.asarray(p["w0"]) + np.asarray(p["b0"]), 0)
  return float(np.mean(np.argmax(h @ np.asarray(p["w1"]) + np.asarray(p["b1"]), -1) == y))


PULL = 0.1


def algo_setup(algo, sgd):
  """(async worker factory, async master, lockstep transform) of one algorithm."""
  import wagrad
  from wagrad import async_
  master_kw = dict(timeout_s=300)
  return {
      "easgd": (lambda i: async_.EASGDWorker(i, TAU, timeout_s=300),
                lambda p0, log: async_.serve_easgd(p0, K, alpha=ALPHA, callback=log, **master_kw),
                lambda ax: wagrad.easgd(sgd, TAU, alpha=ALPHA, axis_name=ax)),
      "downpour": (lambda i: async_.DownpourWorker(i, TAU, timeout_s=300),
                   lambda p0, log: async_.serve_downpour(p0, K, callback=log, **master_kw),
                   lambda ax: wagrad.downpour(sgd, TAU, axis_name=ax)),
      "lsgd": (lambda i: async_.LSGDWorker(i, TAU, pull=PULL, timeout_s=300),
               lambda p0, log: async_.serve_lsgd(p0, K, callback=log, **master_kw),
               lambda ax: wagrad.lsgd(sgd, TAU, pull=PULL, axis_name=ax)),
      "softsync": (lambda i: async_.SoftsyncLearner(i, timeout_s=300),
                   lambda p0, log: async_.serve_softsync(p0, K, K, alpha0=LR, callback=log,
                                                         **master_kw),
                   lambda ax: wagrad.sync_sgd(sgd, axis_name=ax)),
      "wpsgd": (lambda i: async_.WPSGDWorker(i, budget_s=None, timeout_s=300),
                lambda p0, log: async_.serve_wpsgd(p0, K, timeout_s=300),
                lambda ax: wagrad.wpsgd(sgd, weighting="samples", axis_name=ax)),
  }[algo]


def worker_main(a):
  import jax
  import jax.numpy as jnp
  import optax

  import wagrad
  from wagrad._src import kvstore

  if a.variant == "async":
    jax.config.update("jax_enable_recoverability", True)
  wagrad.initialize_distributed(f"127.0.0.1:{a.port}", a.processes, a.rank, timeout_seconds=120)
  jax.devices()  # every process starts its backend (its start-up waits for all of them)
  Xs, ys, Xte, yte = data()
  idx = np.random.default_rng(1).integers(0, Xs.shape[1], size=(a.steps, K, BATCH))
  p0, sgd = init_params(), optax.sgd(LR)
  make_worker, serve, lockstep_tx = algo_setup(a.algo, sgd)
  timeline = []
  budget = a.steps * a.step_ms / 1000  # wpsgd: a fast worker's time for --steps steps

  def loss_fn(p, x, y):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w1"] + p["b1"], y).mean()

  def pause(i):
    time.sleep(a.step_ms / 1000 * (a.slow if i == 0 else 1.0))

  if a.variant == "async" and a.rank == 0:
    kvstore.barrier("start", 300)
    t0 = time.perf_counter()

    def log(params, served):
      if served.sum() % 4 == 0:
        timeline.append((time.perf_counter() - t0, accuracy(params, Xte, yte)))
    final = serve(p0, log)[0]
    timeline.append((time.perf_counter() - t0, accuracy(final, Xte, yte)))
  elif a.variant == "async":
    i = a.rank - 1
    worker = make_worker(i)

    @jax.jit
    def local(p, s, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = sgd.update(g, s, p)
      return loss, g, u, s
    p, s = jax.tree_util.tree_map(jnp.asarray, p0), sgd.init(p0)
    jax.block_until_ready(local(p, s, Xs[i, idx[0, i]], ys[i, idx[0, i]]))  # compile
    kvstore.barrier("start", 300)
    t0 = time.perf_counter()
    for t in range(a.steps):
      if a.algo == "wpsgd" and time.perf_counter() - t0 > budget:
        break
      pause(i)
      loss, g, u, s = local(p, s, Xs[i, idx[t, i]], ys[i, idx[t, i]])
      if a.algo == "softsync":
        p = worker.push_pull(p, g)
      elif a.algo == "lsgd":
        p = worker.apply_updates(p, u, loss)
      else:
        p = worker.apply_updates(p, u)
    if a.algo == "wpsgd":
      p = worker.combine(p)
    worker.close()
  else:
    runner = wagrad.Runner("shard_map", K)
    tx = lockstep_tx(runner.axis_name)

    def step(p, s, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p, value=loss)
      return wagrad.apply_updates(p, u, s), s
    f = runner.map(step, donate_argnums=(0, 1))
    p, s = runner.replicate(p0), runner.init(tx, p0)
    batch = lambda t: runner.put((Xs[np.arange(K)[:, None], idx[t]],  # noqa: E731
                                  ys[np.arange(K)[:, None], idx[t]]))
    p, s = f(p, s, *batch(0))  # compile (one untimed step)
    kvstore.barrier("start", 300)
    t0, evaluating = time.perf_counter(), 0.0
    # wpsgd in the same budget: every step waits for the slowest worker
    steps = a.steps if a.algo != "wpsgd" else max(int(a.steps / a.slow), 2)
    for t in range(1, steps):
      pause(a.rank)
      p, s = f(p, s, *batch(t))
      if (t % 4 == 0 and a.algo != "wpsgd") or t == steps - 1:
        e0 = time.perf_counter()  # evaluation time is not counted (a collective here)
        model = wagrad.evaluated_params(p, s)
        if a.rank == 0:
          timeline.append((e0 - t0 - evaluating, accuracy(model, Xte, yte)))
        evaluating += time.perf_counter() - e0
  if a.rank == 0:
    with open(a.tmp, "w") as fh:
      json.dump(timeline, fh)


def launch(variant, a):
  with socket.socket() as sk:
    sk.bind(("127.0.0.1", 0))
    port = sk.getsockname()[1]
  n = K + 1 if variant == "async" else K
  tmp = os.path.join(a.tmpdir, f"{a.algo}_{variant}.json")
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--worker", variant, "--rank", str(r),
       "--port", str(port), "--processes", str(n), "--tmp", tmp, "--steps", str(a.steps),
       "--algo", a.algo,
       "--step-ms", str(a.step_ms), "--slow", str(a.slow)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
  try:
    outs = [p.communicate(timeout=a.deadline)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()  # SIGKILL: a hung JAX process ignores SIGTERM
  if any(p.returncode for p in procs):
    raise RuntimeError(f"{variant} failed:\n" + "\n".join(o[-1500:] for o in outs))
  with open(tmp) as fh:
    return json.load(fh)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=400, help="own steps per worker")
  ap.add_argument("--step-ms", type=float, default=10.0, help="sleep per step (ms)")
  ap.add_argument("--slow", type=float, default=4.0, help="worker 0's slowdown")
  ap.add_argument("--target", type=float, default=0.9)
  ap.add_argument("--deadline", type=float, default=600)
  ap.add_argument("--out", default="async_stragglers")
  ap.add_argument("--algos", default="easgd,downpour,lsgd,softsync,wpsgd")
  for name in ("--worker", "--rank", "--port", "--processes", "--tmp", "--algo"):
    ap.add_argument(name, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    a.rank, a.port, a.processes = int(a.rank), int(a.port), int(a.processes)
    a.variant = a.worker
    return worker_main(a)
  import tempfile
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import common
  res = {"workers": K, "tau": TAU, "alpha": ALPHA, "lr": LR, "batch": BATCH,
         "steps": a.steps, "step_ms": a.step_ms, "slow": a.slow, "target": a.target,
         "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as a.tmpdir:
    for a.algo in a.algos.split(","):
      res[a.algo] = {}
      for variant in ("async", "lockstep"):
        tl = launch(variant, a)
        hit = next((t for t, acc in tl if acc >= a.target), None)
        res[a.algo][variant] = {"timeline": tl, "time_to_target_s": hit,
                                "final_accuracy": tl[-1][1] if tl else None,
                                "wall_s": tl[-1][0] if tl else None}
        print(f"{a.algo:9s} {variant:9s} time to {a.target:.2f}: {hit} s, final accuracy "
              f"{tl[-1][1]:.3f} at {tl[-1][0]:.1f} s", flush=True)
  common.save(a.out, res)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  algos = a.algos.split(",")
  fig, axes = plt.subplots(1, len(algos), figsize=(3.2 * len(algos), 3.2), squeeze=False)
  for ax, algo in zip(axes[0], algos):
    for variant in ("async", "lockstep"):
      t, acc = zip(*res[algo][variant]["timeline"])
      ax.plot(t, acc, marker="o" if len(t) < 3 else None, label=variant)
    ax.axhline(a.target, color="gray", lw=0.5)
    ax.set_ylim(0.5, 1.0)
    ax.set_xlabel("wall-clock s")
    ax.set_title(algo)
  axes[0][0].set_ylabel("test accuracy of the evaluated model")
  axes[0][0].legend()
  fig.suptitle(f"{K} worker processes, one {a.slow:g}x slower")
  fig.tight_layout()
  fig.savefig(os.path.join(common.OUT, a.out + ".png"), dpi=110)
  return res


if __name__ == "__main__":
  main()
