"""CIFAR with truly asynchronous workers: a master process and N worker processes.

Each worker process trains its own copy of the model (one device each) at its own pace
and exchanges with the master only when its own clock says so (``wagrad.async_``), so
a slow GPU or a shared host delays no one::

    python -m examples.cifar.async_main --algo easgd --workers 4 --time-budget 720 \\
        --dataset cifar10 --model resnet20 --out runs/async_c10

``--algo``: ``easgd`` (the master keeps the center), ``downpour`` (a parameter server),
``lsgd`` (the master keeps the best leader reported) or ``wpsgd`` (every worker for the
budget, then the combination weighted by steps). The whole model (parameters and
BatchNorm statistics) is what the workers exchange, so the master's model is ready to
evaluate. Staleness-aware softsync pushes gradients, which BatchNorm statistics do not
have: it runs in ``examples/async_digits.py``. The master evaluates its model on the
test set every ``--eval-every`` exchanges (``metrics.jsonl``, progress lines) and at the
end (``summary.json``, as ``examples.cifar.main`` writes it).

One command starts every process on this host (each sees JAX's default devices: on a
multi-GPU host set ``CUDA_VISIBLE_DEVICES`` per process, or run one process per host
with the same flags plus ``--coordinator host:port --processes N+1 --rank r``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


ALGOS = ("easgd", "downpour", "lsgd", "wpsgd")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--algo", default="easgd", choices=ALGOS)
  ap.add_argument("--workers", type=int, default=4, help="worker processes (N)")
  ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--no-download", action="store_true")
  ap.add_argument("--model", default="resnet20", help="resnet20 or vgg16")
  ap.add_argument("--width-multiplier", type=float, default=1.0)
  ap.add_argument("--batch-size", type=int, default=128, help="per worker")
  ap.add_argument("--lr", type=float, default=0.1)
  ap.add_argument("--momentum", type=float, default=0.9)
  ap.add_argument("--nesterov", action="store_true")
  ap.add_argument("--weight-decay", type=float, default=1e-4)
  ap.add_argument("--sampling", default="whole", choices=["shards", "whole"])
  ap.add_argument("--sync-period", type=int, default=4, help="tau, a worker's own steps")
  ap.add_argument("--alpha", type=float, default=0.9 / 4, help="EASGD's moving rate")
  ap.add_argument("--pull", type=float, default=0.1, help="LSGD's pull")
  ap.add_argument("--time-budget", type=float, default=720.0, metavar="SECONDS",
                  help="each worker's wall-clock training time")
  ap.add_argument("--steps", type=int, default=None, help="at most this many own steps")
  ap.add_argument("--eval-every", type=int, default=100, help="exchanges between tests")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="runs/async_cifar")
  ap.add_argument("--deadline", type=float, default=None,
                  help="seconds before every process is killed (default: budget + 10 min)")
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--processes", type=int, default=None)
  ap.add_argument("--rank", type=int, default=None)
  ap.add_argument("--mock-data", type=int, default=None, help=argparse.SUPPRESS)  # tests
  a = ap.parse_args(argv)
  if a.workers < 1 or a.batch_size < 1 or a.sync_period < 1 or a.eval_every < 1:
    ap.error("--workers, --batch-size, --sync-period and --eval-every must be >= 1")
  if not a.time_budget > 0 and a.steps is None:
    ap.error("--time-budget must be > 0 (or give --steps)")
  return a


def _load(a):
  from examples.cifar import input_pipeline
  if a.mock_data is None:
    return input_pipeline.load(a.dataset, a.data_dir, download=not a.no_download)
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=a.mock_data):
    return input_pipeline.load(a.dataset)


def run_process(a) -> int:
  import jax

  jax.config.update("jax_enable_recoverability", True)  # a dead worker stops no one
  import wagrad
  from wagrad import async_
  from examples.cifar import input_pipeline, models, train

  wagrad.initialize_distributed(a.coordinator, a.processes, a.rank)
  K = a.processes - 1
  data = _load(a)
  model = models.create_model(a.model, data.num_classes, a.width_multiplier)
  variables0 = dict(train._init_variables(a.model, data.num_classes, a.width_multiplier,
                                          a.seed))
  if a.rank == 0:
    return serve(a, K, model, variables0, data, async_)
  return work(a, a.rank - 1, K, model, variables0, data, async_, input_pipeline)


def work(a, i, K, model, variables, data, async_, input_pipeline) -> int:
  """Worker i: local steps of the whole model at its own pace, exchanges when due."""
  import jax
  import jax.numpy as jnp
  import optax

  inner = optax.chain(optax.add_decayed_weights(a.weight_decay),
                      optax.sgd(a.lr, momentum=a.momentum or None, nesterov=a.nesterov))
  batches = input_pipeline.WorkerBatches(data.train_images, data.train_labels, K,
                                         a.batch_size, seed=a.seed, workers=[i],
                                         sampling=a.sampling)

  @jax.jit
  def local(v, opt_state, images, labels):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": v["batch_stats"]},
                                input_pipeline.normalize(images), train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new
    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
    u, opt_state = inner.update(g, opt_state, v["params"])
    stats = jax.tree_util.tree_map(jnp.subtract, new["batch_stats"], v["batch_stats"])
    return loss, {"params": u, "batch_stats": stats}, opt_state

  worker = {"easgd": lambda: async_.EASGDWorker(i, a.sync_period),
            "downpour": lambda: async_.DownpourWorker(i, a.sync_period),
            "lsgd": lambda: async_.LSGDWorker(i, a.sync_period, pull=a.pull),
            "wpsgd": lambda: async_.WPSGDWorker(i, budget_s=a.time_budget)}[a.algo]()
  v = jax.tree_util.tree_map(jnp.asarray, variables)
  opt_state = inner.init(v["params"])
  t0, t = None, 0  # the budget starts after the first step (its compilation)
  while (t0 is None or time.monotonic() - t0 < a.time_budget) and (
      a.steps is None or t < a.steps):
    images, labels = batches(t)
    loss, u, opt_state = local(v, opt_state, images[0], labels[0])
    v = worker.apply_updates(v, u, loss) if a.algo == "lsgd" else worker.apply_updates(v, u)
    t, t0 = t + 1, time.monotonic() if t0 is None else t0
  if a.algo == "wpsgd":
    v = worker.combine(v)
  worker.close()
  return 0


def serve(a, K, model, variables0, data, async_) -> int:
  """The master: serve until every worker has closed, testing its model as it goes."""
  import jax
  from examples.cifar import input_pipeline

  @jax.jit
  def correct(v, images, labels):
    logits = model.apply(v, input_pipeline.normalize(images), train=False)
    return (logits.argmax(-1) == labels).sum()

  def test_accuracy(v):
    n = len(data.test_labels)
    hits = sum(int(correct(v, data.test_images[j:j + 500], data.test_labels[j:j + 500]))
               for j in range(0, n, 500))
    return hits / n

  os.makedirs(a.out, exist_ok=True)
  metrics = open(os.path.join(a.out, "metrics.jsonl"), "w")
  t0 = time.perf_counter()

  def report(v, served):
    n = int(served.sum())
    if n % a.eval_every == 0:
      row = {"exchanges": n, "seconds": time.perf_counter() - t0,
             "test_accuracy": test_accuracy(v)}
      metrics.write(json.dumps(row) + "\n")
      metrics.flush()
      print(f"[{row['seconds']:7.1f} s] exchanges {n:6d}  test accuracy "
            f"{row['test_accuracy']:.4f}", flush=True)

  kw = dict(timeout_s=a.time_budget + 600)
  if a.algo == "easgd":
    final, served, gone = async_.serve_easgd(variables0, K, alpha=a.alpha, callback=report,
                                             **kw)
  elif a.algo == "downpour":
    final, served, gone = async_.serve_downpour(variables0, K, callback=report, **kw)
  elif a.algo == "lsgd":
    final, served, gone = async_.serve_lsgd(variables0, K, callback=report, **kw)
  else:
    final, served, gone = async_.serve_wpsgd(variables0, K, **kw)
  metrics.close()
  acc = test_accuracy(final)
  print(f"{a.algo}: {K} worker processes, test accuracy {acc:.4f} after "
        f"{time.perf_counter() - t0:.1f} s; {'steps' if a.algo == 'wpsgd' else 'exchanges'}"
        f" per worker {[int(s) for s in served]}" + (f"; dead: {gone}" if gone else ""),
        flush=True)
  with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump({"algorithm": f"async_{a.algo}", "workers": K, "dataset": a.dataset,
               "model": a.model, "sampling": a.sampling, "time_budget": a.time_budget,
               "final": {"test_accuracy": acc}, "served": [int(s) for s in served],
               "gone": list(gone)}, f, indent=1)
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parse_args(argv)
  from examples import processes
  return processes.run(a, argv, [sys.executable, "-m", "examples.cifar.async_main"],
                       run_process, a.deadline or a.time_budget + 600)


if __name__ == "__main__":
  sys.exit(main())
