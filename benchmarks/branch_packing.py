"""Which operands and results of the exchange branch should travel packed?

Every periodic wagrad transform chooses its branch (local step / exchange / end of the
warm-up) with ``periodic.flat_switch``, which can move each operand and each result of
the branch either as one flat buffer per dtype ("packed") or leaf by leaf (as
``lax.switch``). Packing saves a buffer per leaf; it costs a concatenate of every packed
per-worker tree (inside the branch for a result the local branch passes through).

This script times each transform's step with the four choices (both packed, neither,
only the operands, only the results), every choice compiled into its own program by
replacing ``periodic.flat_switch`` while that program is traced, against the
hand-written averaging steps of ``overhead.py`` in the same process (interleaved
repetitions, paired ratios, 90% bootstrap intervals of the median). Shared states pack
themselves (``shared_state(packed=True)``), so the choice only matters for per-worker
trees: parameters, updates, inner optimizer states.

    python benchmarks/branch_packing.py                 # tiny model, tau 16
    python benchmarks/branch_packing.py --model small --reps 15

With ``--join`` it compares instead how the packed operands and results are joined
(everything packed): ``jnp.concatenate`` against ``dynamic_update_slice`` into a fresh
buffer (``base.concat_by_updates``; see ``concat.py``), forced on every transform
whatever it chooses itself (``branch_packing_join.json``):

    python benchmarks/branch_packing.py --join --model small --tau 1
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import numpy as np  # noqa: E402

import wagrad  # noqa: E402
from wagrad._src import periodic  # noqa: E402
from overhead import (MODELS, compared_algorithms, extra_algorithms, hand_variant,  # noqa: E402
                      setup, wagrad_variant)

CHOICES = {  # name -> (pack_operands, pack_results, join); None: the transform's own
    "packed": (True, True, None),
    "leaves": (False, False, None),
    "operands packed": (True, False, None),
    "results packed": (False, True, None),
}
JOIN_CHOICES = {
    "packed": (True, True, "concatenate"),
    "packed by updates": (True, True, "updates"),
}


def compiled_with(choice, make_variant, choices=CHOICES):
  """Build and warm up a variant while periodic.flat_switch packs as ``choice`` says
  (overriding what the transform passes)."""
  orig = periodic.flat_switch
  pack_in, pack_out, join = choices[choice]

  def forced(*args, **kw):
    kw.update(pack_operands=pack_in, pack_results=pack_out)
    if join is not None:
      kw["join"] = join
    return orig(*args, **kw)
  periodic.flat_switch = forced
  try:
    f, st = make_variant()
    st = common.warm_up(f, st)
  finally:
    periodic.flat_switch = orig
  return f, st


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
  ap.add_argument("--tau", type=int, default=16)
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--quick", action="store_true", help="5 repetitions (run_all.py --quick)")
  ap.add_argument("--algorithms", default=None, help="comma-separated subset")
  ap.add_argument("--join", action="store_true",
                  help="compare jnp.concatenate with dynamic_update_slice packing")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  args.reps = args.reps or (5 if args.quick else 15)
  choices = JOIN_CHOICES if args.join else CHOICES
  args.out = args.out or ("branch_packing_join" if args.join else "branch_packing")
  batch, hidden = MODELS[args.model]
  steps = args.steps or {"tiny": 160, "small": 48}[args.model]
  runner = wagrad.Runner("shard_map", 8)
  p0, x, y, loss_fn = setup(8, batch, hidden)
  algos = {**compared_algorithms(), "wasgd": extra_algorithms()["wasgd"]}
  if args.algorithms:
    algos = {k: algos[k] for k in args.algorithms.split(",")}

  variants = {}
  for ref, kw in (("hand", {}), ("hand as updates", {"as_updates": True})):
    f, st = hand_variant(runner, p0, x, y, loss_fn, args.tau, **kw)
    variants[ref] = (f, common.warm_up(f, st))
  for algo, make in algos.items():
    for choice in choices:
      variants[f"{algo} | {choice}"] = compiled_with(
          choice, lambda make=make: wagrad_variant(runner, make(args.tau), p0, x, y, loss_fn),
          choices)
  print(f"{len(variants)} programs compiled; {args.reps} x {steps} steps each", flush=True)

  states = {k: st for k, (_, st) in variants.items()}
  times = {k: [] for k in variants}
  for r in range(args.reps):
    for k, (f, _) in variants.items():
      dt, states[k] = common.time_steps(f, states[k], steps)
      times[k].append(dt)
    print(f"rep {r + 1}/{args.reps}", flush=True)

  rng = np.random.default_rng(0)

  def ratio(a, b):
    r = np.asarray(times[a]) / np.asarray(times[b])
    meds = np.median(r[rng.integers(0, len(r), (2000, len(r)))], axis=1)
    return float(np.median(r)), [float(np.percentile(meds, 5)), float(np.percentile(meds, 95))]

  rows = []
  for k in variants:
    algo, _, choice = k.partition(" | ")
    row = {"variant": k, "algorithm": algo, "choice": choice or None,
           "median_ms": 1e3 * float(np.median(times[k]))}
    row["x_hand"], row["x_hand_90ci"] = ratio(k, "hand")
    row["x_hand_as_updates"], row["x_hand_as_updates_90ci"] = ratio(k, "hand as updates")
    if choice and choice != "packed":
      row["x_packed"], row["x_packed_90ci"] = ratio(k, f"{algo} | packed")
    rows.append(row)
    print(f"{k:44s} {row['median_ms']:7.3f} ms  x{row['x_hand']:.3f} hand"
          + (f"  x{row['x_packed']:.3f} packed" if "x_packed" in row else ""))
  common.save(args.out, {"device": common.device_info(), "model": args.model,
                         "tau": args.tau, "steps": steps, "reps": args.reps,
                         "choices": {k: list(v) for k, v in choices.items()}, "rows": rows})
  return rows


if __name__ == "__main__":
  main()
