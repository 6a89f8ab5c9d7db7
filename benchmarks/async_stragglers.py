"""Asynchronous EASGD across processes against the same rule in lockstep, one straggler.

3 worker processes on this machine (one CPU device each, loopback), scikit-learn's
digits split over the workers, an MLP 64 -> 64 -> 10, inner SGD 0.1, 32 examples per
step, tau = 4, alpha = 0.3. Every step costs ``--step-ms`` (a sleep standing for the
compute of a larger model); worker 0 is ``--slow``x slower. Variants:

* ``async``: ``wagrad.async_`` -- process 0 is the master keeping the center (it
  evaluates the center every 4 exchanges), processes 1..3 the workers, each at its own
  pace;
* ``lockstep``: ``wagrad.easgd`` on ``Runner("shard_map", 3)`` across the 3 processes
  (``jax.distributed``, gloo): every exchange waits for the slowest worker; process 0
  evaluates the center every 4 steps.

Every worker runs ``--steps`` of its own steps. Reported: the center's test accuracy
against wall-clock seconds (from a barrier after compilation) and the time to reach
``--target``; in ``results/async_stragglers.json`` and ``.png``.

    python benchmarks/async_stragglers.py
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


def worker_main(a):
  import jax
  import jax.numpy as jnp
  import optax

  import wagrad
  from wagrad import async_
  from wagrad._src import kvstore

  if a.variant == "async":
    jax.config.update("jax_enable_recoverability", True)
  wagrad.initialize_distributed(f"127.0.0.1:{a.port}", a.processes, a.rank, timeout_seconds=120)
  jax.devices()  # every process starts its backend (its start-up waits for all of them)
  Xs, ys, Xte, yte = data()
  idx = np.random.default_rng(1).integers(0, Xs.shape[1], size=(a.steps, K, BATCH))
  p0, sgd = init_params(), optax.sgd(LR)
  timeline = []

  def loss_fn(p, x, y):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w1"] + p["b1"], y).mean()

  def pause(i):
    time.sleep(a.step_ms / 1000 * (a.slow if i == 0 else 1.0))

  if a.variant == "async":
    if a.rank == 0:
      kvstore.barrier("start", 300)
      t0 = time.perf_counter()

      def log(center, served):
        if served.sum() % 4 == 0:
          timeline.append((time.perf_counter() - t0, accuracy(center, Xte, yte)))
      async_.serve_easgd(p0, K, alpha=ALPHA, timeout_s=300, callback=log)
    else:
      i = a.rank - 1
      worker = async_.EASGDWorker(i, TAU, timeout_s=300)

      @jax.jit
      def local(p, s, x, y):
        u, s = sgd.update(jax.grad(loss_fn)(p, x, y), s, p)
        return u, s
      p, s = jax.tree_util.tree_map(jnp.asarray, p0), sgd.init(p0)
      jax.block_until_ready(local(p, s, Xs[i, idx[0, i]], ys[i, idx[0, i]]))  # compile
      kvstore.barrier("start", 300)
      for t in range(a.steps):
        pause(i)
        u, s = local(p, s, Xs[i, idx[t, i]], ys[i, idx[t, i]])
        p = worker.apply_updates(p, u)
      worker.close()
  else:
    runner = wagrad.Runner("shard_map", K)
    tx = wagrad.easgd(sgd, TAU, alpha=ALPHA, axis_name=runner.axis_name)

    def step(p, s, x, y):
      u, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
      return wagrad.apply_updates(p, u, s), s
    f = runner.map(step, donate_argnums=(0, 1))
    p, s = runner.replicate(p0), runner.init(tx, p0)
    batch = lambda t: runner.put((Xs[np.arange(K)[:, None], idx[t]],  # noqa: E731
                                  ys[np.arange(K)[:, None], idx[t]]))
    p, s = f(p, s, *batch(0))  # compile (one untimed step)
    kvstore.barrier("start", 300)
    t0 = time.perf_counter()
    for t in range(1, a.steps):
      pause(a.rank)
      p, s = f(p, s, *batch(t))
      if a.rank == 0 and t % 4 == 0:
        center = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)),
                                        wagrad.easgd_center(s))
        timeline.append((time.perf_counter() - t0, accuracy(center, Xte, yte)))
  if a.rank == 0:
    with open(a.tmp, "w") as fh:
      json.dump(timeline, fh)


def launch(variant, a):
  with socket.socket() as sk:
    sk.bind(("127.0.0.1", 0))
    port = sk.getsockname()[1]
  n = K + 1 if variant == "async" else K
  tmp = os.path.join(a.tmpdir, variant + ".json")
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "--worker", variant, "--rank", str(r),
       "--port", str(port), "--processes", str(n), "--tmp", tmp, "--steps", str(a.steps),
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
  for name in ("--worker", "--rank", "--port", "--processes", "--tmp"):
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
    for variant in ("async", "lockstep"):
      tl = launch(variant, a)
      hit = next((t for t, acc in tl if acc >= a.target), None)
      res[variant] = {"timeline": tl, "time_to_target_s": hit,
                      "final_accuracy": tl[-1][1] if tl else None,
                      "wall_s": tl[-1][0] if tl else None}
      print(f"{variant:9s} time to {a.target:.2f}: {hit} s, final accuracy "
            f"{res[variant]['final_accuracy']}, last at {res[variant]['wall_s']:.1f} s",
            flush=True)
  common.save(a.out, res)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for variant in ("async", "lockstep"):
    t, acc = zip(*res[variant]["timeline"])
    ax.plot(t, acc, label=variant)
  ax.axhline(a.target, color="gray", lw=0.5)
  ax.set_xlabel("wall-clock s"), ax.set_ylabel("center test accuracy")
  ax.set_title(f"EASGD, {K} worker processes, one {a.slow:g}x slower")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(common.OUT, a.out + ".png"), dpi=120)
  return res


if __name__ == "__main__":
  main()
