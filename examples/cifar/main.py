"""Train a Flax ResNet/VGG on CIFAR-10/100 with any wagrad algorithm, on any backend.

    python -m examples.cifar.main --algorithm model_averaging --sync-period 8 \\
        --workers 8 --backend shard_map --epochs 160 --data-dir ~/tensorflow_datasets

Run from the repository root (``python examples/cifar/main.py ...`` works too). See
examples/cifar/README.md for multi-GPU and multi-host commands. A bad setting prints
one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make `examples.cifar` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))))


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, status 2 (argparse would print the usage too)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
  from examples.cifar import algorithms as algos
  ap = _Parser(description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--algorithm", default="sync_sgd", help="see --list")
  ap.add_argument("--list", action="store_true", help="list the algorithms and exit")
  g = ap.add_argument_group("data and model")
  g.add_argument("--dataset", default="cifar10", help="cifar10 or cifar100")
  g.add_argument("--data-dir", default=None, help="tensorflow-datasets data directory")
  g.add_argument("--no-download", action="store_true",
                 help="fail instead of downloading and preparing the data set")
  g.add_argument("--model", default="resnet20",
                 help="resnet20 (any resnet<6n+2>: resnet8, resnet32, resnet56) or vgg16")
  g.add_argument("--width-multiplier", type=float, default=1.0,
                 help="scales every channel count (e.g. 0.25 for a tiny model)")
  g = ap.add_argument_group("training")
  g.add_argument("--steps", type=int, default=None, help="global steps (overrides --epochs)")
  g.add_argument("--epochs", type=int, default=160,
                 help="passes over the training set (each worker over its shard)")
  g.add_argument("--batch-size", type=int, default=128, help="per worker")
  g.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                 help="the local (inner) optimizer")
  g.add_argument("--lr", type=float, default=0.1)
  g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
  g.add_argument("--momentum", type=float, default=0.9)
  g.add_argument("--nesterov", action="store_true")
  g.add_argument("--weight-decay", type=float, default=5e-4)
  g.add_argument("--worker-speeds", default=None,
                 help='relative speeds in (0, 1], one per worker, e.g. "1,1,1,0.25" '
                      "(seeded activity schedule)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--sampling", default="shards", choices=["shards", "whole"],
                 help="each worker passes over its own disjoint shard (default), or over "
                      "the whole training set in its own order (the papers' setting)")
  algos.add_arguments(ap)
  g = ap.add_argument_group("parallelism")
  g.add_argument("--backend", default="vmap", help="vmap, shard_map or pmap")
  g.add_argument("--workers", type=int, default=8, help="K workers")
  g.add_argument("--num-devices", type=int, default=None,
                 help="use the first D devices (default: all, at most K); D must divide K")
  g.add_argument("--cpu-devices", type=int, default=None,
                 help="force this many CPU devices (CPU-only machines, before JAX starts)")
  g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  g = ap.add_argument_group("evaluation, checkpoints, output")
  g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                 help="stop training after this much wall-clock time (evaluation and "
                      "checkpoints excluded), evaluate and write summary.json (the LSGD "
                      "paper's comparisons are under a wall-clock budget)")
  g.add_argument("--eval-every", type=int, default=None, help="steps (default: one epoch)")
  g.add_argument("--eval-batch-size", type=int, default=500, help="per worker")
  g.add_argument("--checkpoint-dir", default=None,
                 help="orbax checkpoints; the latest one is restored on start")
  g.add_argument("--checkpoint-every", type=int, default=1000, help="steps")
  g.add_argument("--keep-checkpoints", type=int, default=3)
  g.add_argument("--out", default="runs/cifar", help="folder for metrics.jsonl and metrics.png")
  g.add_argument("--no-plot", dest="plot", action="store_false")
  g.add_argument("--no-progress", dest="progress", action="store_false")
  args = ap.parse_args(argv)
  if args.backend not in ("vmap", "shard_map", "pmap"):
    ap.error(f"unknown --backend {args.backend!r}; choose vmap, shard_map or pmap")
  if args.algorithm not in algos.ALGORITHMS and not args.list:
    ap.error(f"unknown algorithm {args.algorithm!r}; choose from "
             f"{', '.join(algos.ALGORITHMS)}")
  multi = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in multi) and not all(v is not None for v in multi):
    ap.error("multi-host runs need all of --coordinator-address, --num-processes, "
             "--process-id")
  return args


def _start_jax(args):
  """Distributed runtime and device flags, before any JAX computation."""
  if args.cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = (
          f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}").strip()
  if args.coordinator_address is not None:
    import jax
    # CPU collectives across processes (no effect on GPU/TPU computations)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def main(argv=None) -> int:
  try:
    args = parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  from examples.cifar import algorithms as algos
  if args.list:
    print(algos.describe())
    return 0
  try:
    _start_jax(args)
  except Exception as e:  # noqa: BLE001
    print(f"error: cannot start the distributed runtime: {e}".splitlines()[0], file=sys.stderr)
    return 2
  from examples.cifar import input_pipeline, train
  try:
    exp = train.prepare(args)
  except (ValueError, input_pipeline.DataError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    return 2
  train.run(exp)
  return 0


if __name__ == "__main__":
  sys.exit(main())
