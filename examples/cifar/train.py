"""The CIFAR training loop: set-up (``prepare``), then ``run``.

Read it top to bottom: runner -> data -> model -> transform -> per-worker step ->
evaluation -> checkpoint restore -> loop (batches, steps, metrics, checkpoints) -> plot.

Every worker holds its own parameters, BatchNorm statistics and optimizer state
(stacked along a leading worker axis, shared parts of the wagrad state unstacked);
one global step runs the per-worker step on every worker through ``wagrad.Runner``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import wagrad
from wagrad._src import schedules

from examples.cifar import algorithms as algos
from examples.cifar import input_pipeline
from examples.cifar import models


@dataclasses.dataclass
class Experiment:
  args: Any
  runner: wagrad.Runner
  algo: algos.Algorithm
  data: input_pipeline.Data
  batches: input_pipeline.WorkerBatches
  local_workers: list | None       # this process's workers (None: all, one process)
  state: dict                      # params, batch_stats, opt_state (stacked, placed)
  start_step: int
  total_steps: int
  step_fn: Callable
  eval_model_fn: Callable          # (params, loss_sum) -> (consensus distance, mean loss)
  eval_step_fn: Callable
  step_args: Callable              # t -> dict of extra per-step arguments
  manager: Any                     # orbax CheckpointManager or None


# ----------------------------------------------------------------------------- placement


def _local_workers(runner):
  """Workers whose devices belong to this process (None in a single-process run)."""
  if jax.process_count() == 1:
    return None
  if runner.backend != "shard_map":
    raise ValueError("multi-host runs need --backend shard_map")
  per = runner.num_workers // runner.num_devices
  me = jax.process_index()
  return [k for k in range(runner.num_workers)
          if runner.devices[k // per].process_index == me]


def _globalize(runner, local, tree):
  """Per-worker host arrays -> arrays the mapped step takes.

  One process: the full ``[K, ...]`` NumPy arrays (the runner places them). Several
  processes: each process holds only its own workers' rows; they form one global
  array sharded over the mesh. ``wagrad.Shared`` values stay as they are.
  """
  if local is None:
    return tree
  names = runner.mesh.axis_names
  sharding = NamedSharding(runner.mesh, P(names if len(names) > 1 else names[0]))
  K = runner.num_workers

  def g(node):
    if wagrad._src.base.is_shared(node):
      return node
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (K,) + np.shape(x)[1:]), node)
  return jax.tree_util.tree_map(g, tree, is_leaf=wagrad._src.base.is_shared)


def _replicate_on_host(tree, num_workers):
  """``runner.replicate`` in NumPy (no per-leaf device program): K copies of each
  per-worker leaf, shared nodes as they are."""
  def rep(node):
    if wagrad._src.base.is_shared(node):
      return jax.tree_util.tree_map(np.asarray, node)
    return jax.tree_util.tree_map(
        lambda x: np.ascontiguousarray(np.broadcast_to(np.asarray(x), (num_workers,) +
                                                       np.shape(x))), node)
  return jax.tree_util.tree_map(rep, tree, is_leaf=wagrad._src.base.is_shared)


def _first(x) -> float:
  """A value that is the same on every worker, read from this process's first shard."""
  return float(np.asarray(x.addressable_shards[0].data).reshape(-1)[0])


def _local_mean(x) -> float:
  return float(np.mean([np.asarray(s.data) for s in x.addressable_shards]))


# ----------------------------------------------------------------------------- steps


def _unshare(tree):
  return jax.tree_util.tree_map(lambda n: n.value if wagrad._src.base.is_shared(n) else n, tree,
                                is_leaf=wagrad._src.base.is_shared)


def _exchanged(old_state, new_state):
  """True on the steps where the transform exchanged (shared scalar)."""
  new = wagrad._src.base.find_shared(new_state, "num_exchanges")
  old = wagrad._src.base.find_shared(old_state, "num_exchanges")
  if new is None or old is None:
    return jnp.bool_(False)
  return new.num_exchanges != old.num_exchanges


def _where_workers(pred, new, old):
  """``where(pred, new, old)`` on the per-worker leaves; shared nodes are taken from new."""
  return jax.tree_util.tree_map(
      lambda n, o: n if wagrad._src.base.is_shared(n) else jax.tree_util.tree_map(
          lambda a, b: jnp.where(pred, a, b), n, o),
      new, old, is_leaf=wagrad._src.base.is_shared)


def make_steps(model, tx, algo, axis_name):
  """The per-worker training step and evaluation functions (not yet mapped)."""

  def train_step(params, batch_stats, opt_state, images, labels, extra):
    extra = dict(_unshare(extra))
    active = extra.pop("active", None)
    x = input_pipeline.normalize(images)

    def loss_fn(p):
      logits, new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_vars["batch_stats"]

    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if active is not None and algo.speeds == "active":
      extra["active"] = active
    updates, new_state = tx.update(grads, opt_state, params, value=loss, **extra)
    new_params = algo.apply(params, updates, new_state)
    new_bs = wagrad.sync_model_state(new_bs, new_state, axis_name)
    if active is not None:
      # an inactive worker keeps its state, except where an exchange (a barrier) ran
      take = jnp.logical_or(active, _exchanged(opt_state, new_state))
      if algo.speeds == "mask":
        new_params = _where_workers(take, new_params, params)
        new_state = _where_workers(take, new_state, opt_state)
      new_bs = _where_workers(take, new_bs, batch_stats)
    return new_params, new_bs, new_state, loss

  def run_stats(params, loss_sum):
    flat = jax.flatten_util.ravel_pytree(params)[0]  # one collective, not one per leaf
    return wagrad.collectives.consensus_distance(flat, axis_name), lax.pmean(loss_sum, axis_name)

  def eval_step(variables, images, labels, mask):  # variables: wagrad.Shared, one model
    logits = model.apply(variables.value, input_pipeline.normalize(images), train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return (lax.psum(jnp.sum(correct * mask), axis_name),
            lax.psum(jnp.sum(loss * mask), axis_name),
            lax.psum(jnp.sum(mask), axis_name))

  return train_step, run_stats, eval_step


# ----------------------------------------------------------------------------- set-up
# A process that runs several trainings (tests, sweeps) builds the initial model and
# compiles the evaluation once per configuration (jit caches by function identity).


@functools.lru_cache(maxsize=8)
def _init_variables(name, num_classes, width, seed):
  """The model's initial variables (host NumPy arrays), one compiled program."""
  model = models.create_model(name, num_classes, width)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))
  # the "rbg" generator compiles far faster than threefry on CPU (seconds, not a minute)
  return jax.tree_util.tree_map(np.asarray, init(jax.random.key(seed, impl="rbg")))


_EVAL_STEPS: dict = {}


def _mapped_eval_step(runner, model, eval_step):
  key = (runner.backend, runner.num_workers, tuple(runner.devices or ()), model)
  if key not in _EVAL_STEPS:
    if len(_EVAL_STEPS) > 8:
      _EVAL_STEPS.clear()
    _EVAL_STEPS[key] = runner.map(eval_step)
  return _EVAL_STEPS[key]


def prepare(args) -> Experiment:
  """Everything before the first step; a bad setting raises ValueError / DataError."""
  if args.algorithm not in algos.ALGORITHMS:
    raise ValueError(f"unknown algorithm {args.algorithm!r}; choose from "
                     f"{', '.join(algos.ALGORITHMS)}")
  algo = algos.ALGORITHMS[args.algorithm]
  speeds = algos.parse_speeds(args.worker_speeds, args.workers)
  algos.check_speeds(args.algorithm, algo, speeds)
  for name in ("batch_size", "eval_every", "checkpoint_every", "eval_batch_size"):
    v = getattr(args, name)
    if v is not None and v < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
  if args.dataset not in input_pipeline.NUM_CLASSES:
    raise ValueError(f"unknown --dataset {args.dataset!r}; choose one of "
                     f"{', '.join(input_pipeline.NUM_CLASSES)}")
  model = models.create_model(args.model, input_pipeline.NUM_CLASSES[args.dataset],
                              args.width_multiplier)
  runner = wagrad.Runner(args.backend, args.workers, num_devices=args.num_devices)
  local = _local_workers(runner)

  data = input_pipeline.load(args.dataset, args.data_dir, download=not args.no_download)
  batches = input_pipeline.WorkerBatches(data.train_images, data.train_labels, args.workers,
                                         args.batch_size, seed=args.seed, workers=local,
                                         sampling=args.sampling)
  if args.steps is not None:
    total = args.steps
  else:
    total = args.epochs * batches.steps_per_epoch
  if total < 1:
    raise ValueError("--steps/--epochs give no training step")
  args.total_steps = total
  if args.eval_every is None:
    args.eval_every = batches.steps_per_epoch

  variables = _init_variables(args.model, data.num_classes, args.width_multiplier, args.seed)
  tx = algo.build(args, runner)
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
           "opt_state": tx.init(variables["params"])}
  state = runner.put(_replicate_on_host(state, args.workers))

  train_step, run_stats, eval_step = make_steps(model, tx, algo, runner.axis_name)
  active = None if speeds is None else schedules.speed_schedule(
      args.workers, total, speeds, seed=args.seed)
  protocol = None if algo.step_args is None else algo.step_args(args, runner, total)

  def step_args(t):
    extra = {}
    if active is not None:
      extra["active"] = active[t]
    if protocol is not None:
      extra.update(protocol(t))
    return extra

  manager, start = None, 0
  if args.checkpoint_dir:
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(
        os.path.abspath(args.checkpoint_dir),
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep_checkpoints, create=True))
    latest = manager.latest_step()
    if latest is not None:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
      restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
      state = runner.put(restored)  # shard_map needs its inputs placed as in_specs say
      start = int(latest)
  return Experiment(args, runner, algo, data, batches, local, state, start, total,
                    runner.map(train_step), runner.map(run_stats),
                    _mapped_eval_step(runner, model, eval_step),
                    step_args, manager)


# ----------------------------------------------------------------------------- loop


def _finite_mean(x) -> np.ndarray:
  """The mean over workers of a stacked leaf (every worker's rows gathered to each
  process in a multi-host run), leaving out workers with a non-finite value."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(x)
  ok = np.isfinite(x.reshape(len(x), -1)).all(1)
  return x[ok].mean(0) if ok.any() else x.mean(0)


def evaluate(exp: Experiment, loss_sum) -> dict:
  """Test metrics of the model the algorithm's paper evaluates
  (``wagrad.evaluated_params``: the average, center, leader, weighted combination or
  server) with the workers' mean BatchNorm statistics; ``loss_sum``: per-worker summed
  train losses. Every process calls it (it gathers across processes)."""
  s = exp.state
  model = {"params": wagrad.evaluated_params(s["params"], s["opt_state"]),
           "batch_stats": jax.tree_util.tree_map(_finite_mean, s["batch_stats"])}
  dist, train_loss = exp.eval_model_fn(s["params"], loss_sum)
  correct = loss = count = 0.0
  for x, y, m in input_pipeline.eval_batches(exp.data.test_images, exp.data.test_labels,
                                             exp.args.workers, exp.args.eval_batch_size,
                                             exp.local_workers):
    c, l, n = exp.eval_step_fn(wagrad.Shared(model),
                               *_globalize(exp.runner, exp.local_workers, (x, y, m)))
    correct, loss, count = correct + _first(c), loss + _first(l), count + _first(n)
  return {"train_loss_sum": _first(train_loss), "test_accuracy": correct / count,
          "test_loss": loss / count, "consensus_distance": _first(dist)}


def _save(exp: Experiment, step: int):
  if exp.manager is not None:
    import orbax.checkpoint as ocp
    exp.manager.save(step, args=ocp.args.StandardSave(exp.state), force=True)


def run(exp: Experiment) -> dict:
  """Train from ``exp.start_step`` to ``exp.total_steps``; return the last metrics."""
  args, runner = exp.args, exp.runner
  main_process = jax.process_index() == 0
  os.makedirs(args.out, exist_ok=True)
  metrics_path = os.path.join(args.out, "metrics.jsonl")
  if main_process:
    if exp.start_step == 0 and os.path.exists(metrics_path):
      os.remove(metrics_path)
    with open(os.path.join(args.out, "config.json"), "w") as f:
      json.dump({k: v for k, v in vars(args).items()}, f, indent=1, default=str)

  from tqdm.auto import tqdm
  bar = tqdm(total=exp.total_steps, initial=exp.start_step, desc=args.algorithm,
             disable=(not args.progress) or not main_process, mininterval=1.0)
  images_per_step = args.workers * args.batch_size
  loss_sum, n_loss, train_time, n_images = None, 0, 0.0, 0
  last = {}
  spent = 0.0  # training seconds before this evaluation period (for --time-budget)
  t0 = time.perf_counter()
  steps = range(exp.start_step, exp.total_steps)
  for t, (x, y) in input_pipeline.prefetch(exp.batches, steps):
    s = exp.state
    feed = _globalize(runner, exp.local_workers, (x, y, exp.step_args(t)))
    p, bs, o, loss = exp.step_fn(s["params"], s["batch_stats"], s["opt_state"], *feed)
    exp.state = {"params": p, "batch_stats": bs, "opt_state": o}
    loss_sum = loss if loss_sum is None else loss_sum + loss
    n_loss += 1
    n_images += images_per_step
    if t == exp.start_step:  # the first step compiles: leave it out of the throughput
      jax.block_until_ready(exp.state)
      n_images, t0 = 0, time.perf_counter()
    bar.update(1)
    step = t + 1
    if step % 50 == 0 and not bar.disable:
      bar.set_postfix(loss=f"{_local_mean(loss):.3f}", refresh=False)
    out_of_time = (args.time_budget is not None and
                   spent + time.perf_counter() - t0 >= args.time_budget)
    is_eval = step % args.eval_every == 0 or step == exp.total_steps or out_of_time
    if is_eval:
      jax.block_until_ready(exp.state)
      train_time += time.perf_counter() - t0
      ev = evaluate(exp, loss_sum)
      record = {"step": step, "epoch": step / exp.batches.steps_per_epoch,
                "train_loss": ev.pop("train_loss_sum") / n_loss, **ev,
                "images_per_s": n_images / train_time if n_images else None,
                "train_seconds": train_time}
      if main_process:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(record) + "\n")
        bar.write(f"step {step:6d}  epoch {record['epoch']:7.2f}  loss "
                  f"{record['train_loss']:.4f}  test acc {record['test_accuracy']:.4f}  "
                  f"consensus {record['consensus_distance']:.3g}  "
                  f"{record['images_per_s'] or 0:.0f} img/s")
      last = record
      spent += train_time
      loss_sum, n_loss, n_images, train_time = None, 0, 0, 0.0
      t0 = time.perf_counter()
    if exp.manager is not None and (step % args.checkpoint_every == 0
                                    or step == exp.total_steps or out_of_time):
      t_save = time.perf_counter()
      _save(exp, step)
      t0 += time.perf_counter() - t_save  # not training time
    if out_of_time:
      bar.write(f"--time-budget {args.time_budget:g} s reached at step {step}")
      break
  bar.close()
  if exp.manager is not None:
    exp.manager.wait_until_finished()
    exp.manager.close()
  if main_process:
    with open(os.path.join(args.out, "summary.json"), "w") as f:
      json.dump({"algorithm": args.algorithm, "workers": args.workers,
                 "dataset": args.dataset, "model": args.model, "sampling": args.sampling,
                 "time_budget": args.time_budget, "steps_done": last.get("step"),
                 "training_seconds": spent, "final": last,
                 "best_test_accuracy": _best(metrics_path)}, f, indent=1)
  if main_process and args.plot:
    plot(metrics_path, os.path.join(args.out, "metrics.png"),
         f"{args.dataset} {args.model}, {args.algorithm}, {args.workers} workers "
         f"({args.backend})")
  return last


def _best(metrics_path: str):
  rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
  return max((r["test_accuracy"] for r in rows), default=None)


def plot(metrics_path: str, png_path: str, title: str):
  """Four panels of the JSON-lines metrics against the step (matplotlib, Agg)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
  if not rows:
    return
  step = [r["step"] for r in rows]
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  for ax, key, label in zip(axes.flat,
                            ("train_loss", "test_accuracy", "consensus_distance",
                             "images_per_s"),
                            ("train loss", "test accuracy (evaluated model)",
                             "consensus distance", "throughput (images/s)")):
    ax.plot(step, [np.nan if r[key] is None else r[key] for r in rows], marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
