"""wagrad across processes: truly asynchronous workers on scikit-learn's digits.

One command starts a master and N worker processes on this machine (loopback, JAX's
coordination service); every worker trains the CPU example's MLP at its own pace and
exchanges with the master only when its own clock says so, so a slow worker delays
no one (``--slow``: worker 0 that many times slower, a sleep of ``--step-ms`` per step
standing for a larger model's compute)::

    python examples/async_digits.py                          # asynchronous EASGD, 3 workers
    python examples/async_digits.py --algo lsgd --slow 4 --step-ms 5
    python examples/async_digits.py --algo softsync --workers 4 --softsync-n 2
    python examples/async_digits.py --algo wpsgd --budget-s 5   # each worker for 5 s

Algorithms (``wagrad.async_``): ``easgd`` (the master keeps the center), ``downpour``
(a parameter server), ``softsync`` (staleness-aware n-softsync SGD), ``lsgd`` (the master
keeps the best leader reported), ``wpsgd`` (each worker for a wall-clock budget, then the
weighted combination). The master prints its model's test accuracy as the run goes and
writes ``<--out>/<algo>/results.json`` (one file per algorithm), printing its path.

Across hosts: start one process per host with the same flags plus ``--coordinator
host:port --processes N+1 --rank r`` (rank 0 is the master). Each process uses JAX's
default platform; set ``JAX_PLATFORMS=cpu`` to keep them off accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ALGOS = ("easgd", "downpour", "softsync", "lsgd", "wpsgd")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--algo", default="easgd", choices=ALGOS, help="the asynchronous rule")
  ap.add_argument("--workers", type=int, default=3, help="worker processes (N)")
  ap.add_argument("--steps", type=int, default=300, help="own steps per worker")
  ap.add_argument("--batch", type=int, default=16, help="examples per worker step")
  ap.add_argument("--lr", type=float, default=0.1, help="workers' SGD learning rate")
  ap.add_argument("--sync-period", type=int, default=4, help="tau, in a worker's own steps")
  ap.add_argument("--alpha", type=float, default=0.3, help="EASGD's moving rate")
  ap.add_argument("--pull", type=float, default=0.1, help="LSGD's pull toward the leader")
  ap.add_argument("--softsync-n", type=int, default=None,
                  help="n of n-softsync; unset: the number of workers")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="wpsgd: each worker's wall-clock budget; unset: --steps steps")
  ap.add_argument("--slow", type=float, default=1.0, help="worker 0's slowdown factor")
  ap.add_argument("--step-ms", type=float, default=0.0, help="sleep per step (ms)")
  ap.add_argument("--sampling", default="shards", choices=["shards", "whole"],
                  help="a worker draws from its own shard or the whole training set")
  ap.add_argument("--eval-every", type=int, default=20, help="exchanges between reports")
  ap.add_argument("--seed", type=int, default=0, help="data split, init and sampling")
  ap.add_argument("--deadline", type=float, default=600.0,
                  help="seconds before the launcher kills every process")
  ap.add_argument("--out", default="runs/async_digits",
                  help="results go to OUT/ALGO/results.json")
  ap.add_argument("--coordinator", default=None, help="host:port (one process per host)")
  ap.add_argument("--processes", type=int, default=None, help="N + 1 (with --coordinator)")
  ap.add_argument("--rank", type=int, default=None, help="this process (0: the master)")
  a = ap.parse_args(argv)
  if a.workers < 1 or a.steps < 1:
    ap.error("--workers and --steps must be >= 1")
  n = a.workers if a.processes is None else a.processes - 1
  if a.algo == "softsync" and a.softsync_n is not None and (
      a.softsync_n < 1 or n % a.softsync_n):
    ap.error(f"--softsync-n must divide the number of workers ({n}), got {a.softsync_n}")
  return a


def run_process(a):
  import jax

  jax.config.update("jax_enable_recoverability", True)  # a dead worker stops no one
  import optax

  import wagrad
  from wagrad import async_

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from digits_lib import MLP, load_digits

  wagrad.initialize_distributed(a.coordinator, a.processes, a.rank)
  K = a.processes - 1
  (Xtr, ytr), (Xte, yte) = load_digits(a.seed)
  model = MLP()
  params0 = jax.device_get(model.init(jax.random.PRNGKey(a.seed), Xtr[:1]))

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  def accuracy(p):
    return float(np.mean(np.argmax(model.apply(p, Xte), -1) == yte))

  if a.rank == 0:
    return serve(a, K, params0, accuracy, async_)
  i = a.rank - 1
  rng = np.random.default_rng(a.seed + 1 + i)
  pool = np.arange(len(Xtr)) if a.sampling == "whole" else np.array_split(
      np.arange(len(Xtr)), K)[i]
  grad = jax.jit(jax.value_and_grad(loss_fn))
  sgd = optax.sgd(a.lr)
  p, s = params0, sgd.init(params0)
  worker = make_worker(a, i, async_)
  t = 0
  while (worker.running() if a.algo == "wpsgd" and a.budget_s else t < a.steps):
    time.sleep(a.step_ms / 1000 * (a.slow if i == 0 else 1.0))
    b = rng.choice(pool, a.batch)
    loss, g = grad(p, Xtr[b], ytr[b])
    if a.algo == "softsync":
      p = worker.push_pull(p, g)
    else:
      u, s = sgd.update(g, s, p)
      p = worker.apply_updates(p, u, loss) if a.algo == "lsgd" else worker.apply_updates(p, u)
    t += 1
  if a.algo == "wpsgd":
    p = worker.combine(p)
  worker.close()
  return 0


def make_worker(a, i, async_):
  if a.algo == "easgd":
    return async_.EASGDWorker(i, a.sync_period)
  if a.algo == "downpour":
    return async_.DownpourWorker(i, a.sync_period)
  if a.algo == "lsgd":
    return async_.LSGDWorker(i, a.sync_period, pull=a.pull)
  if a.algo == "softsync":
    return async_.SoftsyncLearner(i)
  return async_.WPSGDWorker(i, budget_s=a.budget_s)


def serve(a, K, params0, accuracy, async_):
  """The master: serve until every worker has closed, printing progress."""
  t0, curve = time.perf_counter(), []

  def report(params, served):
    n = int(served.sum())
    if n % a.eval_every == 0:
      acc = accuracy(params)
      curve.append((time.perf_counter() - t0, n, acc))
      print(f"[{curve[-1][0]:7.1f} s] exchanges {n:5d}  per worker {[int(v) for v in served]}  "
            f"test accuracy {acc:.3f}", flush=True)

  if a.algo == "easgd":
    final, served, gone = async_.serve_easgd(params0, K, alpha=a.alpha, callback=report)
  elif a.algo == "downpour":
    final, served, gone = async_.serve_downpour(params0, K, callback=report)
  elif a.algo == "lsgd":
    final, served, gone = async_.serve_lsgd(params0, K, callback=report)
  elif a.algo == "softsync":
    final, served, gone = async_.serve_softsync(params0, K, a.softsync_n or K,
                                                alpha0=a.lr, callback=report)
  else:
    final, served, gone = async_.serve_wpsgd(params0, K)
  acc, wall = accuracy(final), time.perf_counter() - t0
  print(f"{a.algo}: {K} worker processes, test accuracy {acc:.3f} after {wall:.1f} s; "
        f"{'steps' if a.algo == 'wpsgd' else 'exchanges'} per worker {[int(v) for v in served]}"
        + (f"; dead: {gone}" if gone else ""), flush=True)
  path = results_path(a)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as fh:
    json.dump({"args": vars(a), "test_accuracy": acc, "wall_s": wall,
               "served": [int(v) for v in served], "gone": list(gone), "curve": curve},
              fh, indent=1)
  print(f"wrote {path}", flush=True)
  return 0


def results_path(a) -> str:
  """``<--out>/<algo>/results.json``: one algorithm's run leaves the others' results."""
  return os.path.join(a.out, a.algo, "results.json")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import processes
  return processes.run(a, argv, [sys.executable, os.path.abspath(__file__)], run_process,
                       a.deadline)


if __name__ == "__main__":
  sys.exit(main())
