"""The registry of wagrad algorithms this example can train with.

``ALGORITHMS`` maps a command-line name to an :class:`Algorithm`, whose ``build(args,
runner)`` returns the wagrad transform (wrapping the local optimizer that
``--optimizer/--lr/--momentum/--weight-decay`` describe). The model evaluated is the
one the algorithm's paper evaluates, read by ``wagrad.evaluated_params`` (see
``train.evaluate``).

Adding a family is a few lines: a ``build`` function and an entry guarded by
``hasattr(wagrad, ...)``, so the script runs with whichever families the installed
wagrad exports. ``speeds`` says how ``--worker-speeds`` is honoured:

* ``"active"``: the transform takes ``active=`` (this worker's flag) in ``update``;
* ``"mask"``: the example keeps an inactive worker's parameters, optimizer state and
  BatchNorm statistics (``jnp.where``), except on steps where the transform exchanged
  (the exchange is a barrier that waits for every worker, so its result is taken);
* ``"none"``: not supported (e.g. synchronous SGD averages every gradient every step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import optax

import wagrad


# ----------------------------------------------------------------------------- pieces


def inner_optimizer(args, total_steps: int) -> optax.GradientTransformation:
  """The local (per-worker) optimizer from the command line."""
  if args.schedule == "cosine":
    lr = optax.cosine_decay_schedule(args.lr, max(1, total_steps))
  else:
    lr = args.lr
  if args.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=args.weight_decay)
  parts = []
  if args.weight_decay:
    parts.append(optax.add_decayed_weights(args.weight_decay))
  parts.append(optax.sgd(lr, momentum=args.momentum or None, nesterov=args.nesterov))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class Algorithm:
  build: Callable[[Any, Any], Any]     # (args, runner) -> tx
  description: str
  speeds: str = "mask"                 # "active" | "mask" | "none"
  # (args, runner, num_steps) -> (t -> dict of extra tx.update arguments: per-worker
  # arrays with a leading K, or wagrad.Shared values), for protocol schedules
  step_args: Callable | None = None
  apply: Callable = wagrad.apply_updates


def _outer(args):
  if args.outer_lr is None:
    return None
  return optax.sgd(args.outer_lr, momentum=args.outer_momentum or None, nesterov=True)


# ----------------------------------------------------------------------------- baselines


def _sync_sgd(args, runner):
  return wagrad.sync_sgd(inner_optimizer(args, args.total_steps),
                         axis_name=runner.axis_name)


def _model_averaging(args, runner):
  return wagrad.model_averaging(
      inner_optimizer(args, args.total_steps), args.sync_period, axis_name=runner.axis_name,
      warmup_steps=args.warmup_steps, outer_optimizer=_outer(args),
      opt_state_sync=args.opt_state_sync)


def _diloco(args, runner):
  return wagrad.diloco(
      inner=inner_optimizer(args, args.total_steps),
      outer_learning_rate=0.7 if args.outer_lr is None else args.outer_lr,
      outer_momentum=args.outer_momentum, sync_period=args.sync_period,
      warmup_steps=args.warmup_steps, axis_name=runner.axis_name)


ALGORITHMS: dict[str, Algorithm] = {
    "sync_sgd": Algorithm(_sync_sgd, "synchronous all-reduce SGD", speeds="none"),
    "model_averaging": Algorithm(
        _model_averaging, "periodic model averaging / local SGD (--sync-period, "
        "--warmup-steps; --outer-lr adds DiLoCo's outer Nesterov step)"),
    "diloco": Algorithm(_diloco, "DiLoCo: outer Nesterov SGD on the pseudo-gradient "
                        "(--outer-lr, default 0.7; --outer-momentum)"),
}


# ----------------------------------------------------------------------------- families


if hasattr(wagrad, "easgd"):
  def _easgd(args, runner):
    return wagrad.easgd(inner_optimizer(args, args.total_steps), args.sync_period,
                        alpha=args.alpha, beta=args.beta, axis_name=runner.axis_name,
                        warmup_steps=args.warmup_steps, opt_state_sync=args.opt_state_sync)

  ALGORITHMS["easgd"] = Algorithm(_easgd, "elastic averaging SGD, evaluates the center "
                                  "(--alpha or --beta, --sync-period)")

if hasattr(wagrad, "lsgd"):
  def _lsgd(args, runner):
    return wagrad.lsgd(inner_optimizer(args, args.total_steps), args.sync_period,
                       pull=args.pull, proximal=args.proximal, axis_name=runner.axis_name,
                       warmup_steps=args.warmup_steps, opt_state_sync=args.opt_state_sync,
                       num_workers=runner.num_workers)

  ALGORITHMS["lsgd"] = Algorithm(_lsgd, "leader SGD, evaluates the leader "
                                 "(--pull, --proximal, --sync-period)", speeds="active")

if hasattr(wagrad, "wasgd"):
  def _wasgd(args, runner):
    return wagrad.wasgd(inner_optimizer(args, args.total_steps), args.sync_period,
                        temperature=args.temperature, moving_rate=args.moving_rate,
                        weight_fn=args.weight_fn, axis_name=runner.axis_name,
                        warmup_steps=args.warmup_steps, opt_state_sync=args.opt_state_sync,
                        num_workers=runner.num_workers)

  ALGORITHMS["wasgd"] = Algorithm(_wasgd, "loss-weighted model combination "
                                  "(--temperature, --moving-rate, --weight-fn)")

if hasattr(wagrad, "wpsgd"):
  def _wpsgd(args, runner):
    contraction = args.weighting == "contraction"
    kw = dict(weighting=args.weighting,
              learning_rate=args.lr if contraction else None,
              strong_convexity=args.strong_convexity if contraction else None)
    return wagrad.wpsgd(inner_optimizer(args, args.total_steps), args.sync_period,
                        axis_name=runner.axis_name, warmup_steps=args.warmup_steps,
                        opt_state_sync=args.opt_state_sync, num_workers=runner.num_workers,
                        **kw)

  ALGORITHMS["wpsgd"] = Algorithm(_wpsgd, "WP-SGD weighted combination of workers of "
                                  "different speeds (--weighting)", speeds="active")

if hasattr(wagrad, "staleness_aware_sgd"):
  def _staleness(args, runner):
    return wagrad.staleness_aware_sgd(inner_optimizer(args, args.total_steps),
                                      alpha0=args.alpha0, axis_name=runner.axis_name)

  def _softsync_rows(args, runner, num_steps):
    sched = wagrad.schedules.softsync_schedule(runner.num_workers, args.softsync_n, num_steps,
                                     seed=args.seed)

    def row(t):
      push, staleness, apply = sched.row(t)
      return {"push": push, "staleness": staleness, "apply": apply}
    return row

  ALGORITHMS["staleness"] = Algorithm(
      _staleness, "staleness-aware async SGD, n-softsync parameter server (--softsync-n, "
      "--alpha0)", speeds="none", step_args=_softsync_rows,
      apply=wagrad.apply_updates)


# ----------------------------------------------------------------------------- CLI


def add_arguments(ap):
  """The algorithms' hyperparameters (each family reads the ones it needs)."""
  g = ap.add_argument_group("algorithm hyperparameters")
  g.add_argument("--sync-period", type=int, default=8, help="tau: steps between exchanges")
  g.add_argument("--warmup-steps", type=int, default=0,
                 help="synchronous SGD for this many steps first (post-local SGD)")
  g.add_argument("--outer-lr", type=float, default=None,
                 help="outer learning rate: model_averaging becomes DiLoCo; diloco: 0.7")
  g.add_argument("--outer-momentum", type=float, default=0.9)
  g.add_argument("--opt-state-sync", default="local", choices=["local", "average", "reset"])
  g.add_argument("--alpha", type=float, default=None, help="EASGD moving rate")
  g.add_argument("--beta", type=float, default=0.9, help="EASGD p*alpha when --alpha unset")
  g.add_argument("--pull", type=float, default=0.1, help="LSGD pull strength")
  g.add_argument("--proximal", type=float, default=0.1, help="LSGD proximal pull")
  g.add_argument("--temperature", type=float, default=1.0, help="WASGD temperature")
  g.add_argument("--moving-rate", type=float, default=1.0, help="WASGD moving rate")
  g.add_argument("--weight-fn", default="boltzmann", help="WASGD weight function")
  g.add_argument("--weighting", default="samples",
                 help="WP-SGD weights: samples, contraction or uniform")
  g.add_argument("--strong-convexity", type=float, default=1e-4,
                 help="WP-SGD lambda of the contraction weights")
  g.add_argument("--softsync-n", type=int, default=1, help="n of n-softsync")
  g.add_argument("--alpha0", type=float, default=1.0, help="staleness-aware base rate")


def describe() -> str:
  return "\n".join(f"{n:18s} {a.description}" for n, a in ALGORITHMS.items())


def check_speeds(name: str, algo: Algorithm, speeds) -> None:
  if speeds is not None and algo.speeds == "none":
    raise ValueError(f"--worker-speeds is not supported by {name}: its workers cannot "
                     f"skip steps (choose e.g. model_averaging)")


def parse_speeds(text: str | None, num_workers: int):
  if text is None:
    return None
  try:
    s = np.array([float(v) for v in text.split(",")])
  except ValueError:
    raise ValueError(f"--worker-speeds must be comma-separated numbers, got {text!r}") from None
  if s.shape != (num_workers,):
    raise ValueError(f"--worker-speeds needs {num_workers} values (one per worker), "
                     f"got {len(s)}")
  if not np.all((s > 0) & (s <= 1)):
    raise ValueError(f"--worker-speeds must lie in (0, 1], got {text}")
  return s
