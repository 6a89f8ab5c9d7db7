"""Communication-efficient exchange of DiLoCo / model averaging: bytes, step time, accuracy.

Variants (DiLoCo: inner SGD, outer Nesterov SGD 0.7 / 0.9 on the pseudo-gradient):
``float32`` (the plain exchange), ``bfloat16`` and ``int8`` (compressed exchange with
error feedback), ``int8, no feedback``, ``streaming F=3`` (three fragments exchanged in
turn) and ``streaming F=3 + int8``.

1. **Bytes a worker sends per exchange** (8 workers, ring algorithms), at 1M and 10M
   parameters (the MLP of ``overhead.py``), read from the compiled ``shard_map``
   programs: every collective of the compressed programs against one float32
   all-reduce of the parameters (which the float32 program holds; it holds a second one
   in the branch that runs only when a worker is non-finite). Streaming: the bytes of
   one period, and the largest fragment's share (the peak of one step).
2. **Step time** at 1M and 10M parameters (``shard_map`` over 8 forced CPU devices and
   ``vmap`` with 8 workers on one device; donated state, each step waited for), tau = 1
   (every step exchanges) and tau = 8: the
   variants take turns in interleaved rounds; reported: median ms per step and the
   median paired ratio to ``float32`` of the same round.
3. **Accuracy** on the CPU example's data (digits, 8 workers, 300 steps, tau = 8,
   seeds 0-4): final test accuracy of the evaluated model (DiLoCo's x_global) and its
   gap to ``float32`` per seed.

    python benchmarks/exchange.py               # all three parts
    python benchmarks/exchange.py --parts accuracy --seeds 3

Writes ``results/exchange_<platform>.json`` and ``.png``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets XLA_FLAGS first)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import wagrad  # noqa: E402
import overhead  # noqa: E402  (the MLP of the overhead benchmark)

K = 8
OUTER = dict(outer_learning_rate=0.7, outer_momentum=0.9)
VARIANTS = {
    "float32": {},
    "bfloat16": dict(compression="bfloat16"),
    "int8": dict(compression="int8"),
    "int8, no feedback": dict(compression="int8", error_feedback=False),
    "streaming F=3": dict(num_fragments=3),
    "streaming F=3 + int8": dict(num_fragments=3, compression="int8"),
}


def make_tx(lr, tau, axis_name, **kw):
  return wagrad.diloco(inner=optax.sgd(lr), sync_period=tau, axis_name=axis_name, **OUTER,
                       **kw)


def _step(tx):
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(overhead.loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s
  return step


def batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(K, overhead.BATCH, overhead.IN)).astype(np.float32)
  return x, rng.integers(0, overhead.OUT, size=(K, overhead.BATCH)).astype(np.int32)


def bytes_part(sizes):
  rows = []
  for size in sizes:
    r = wagrad.Runner("shard_map", K)
    p0 = overhead.init_params(overhead.SIZES[size])
    n = sum(x.size for x in jax.tree_util.tree_leaves(p0))
    x, y = batch()
    f32 = 2 * (K - 1) / K * 4 * n
    for name, kw in VARIANTS.items():
      F = kw.get("num_fragments", 1)
      tx = make_tx(overhead.LR, max(F, 1), r.axis_name, **kw)
      hlo = r.map(_step(tx)).lower(r.replicate(p0), r.init(tx, p0), x, y).compile().as_text()
      found = common.collective_bytes(hlo)
      measured = sum(common.wire_bytes(found[part], K) for part in found)
      if "compression" not in kw:  # its program also holds the non-finite branch's copy
        assert measured >= f32, (name, measured, f32)
        sent = f32
      else:
        sent = measured
      frag = overhead_fragments(p0, F)
      rows.append({"size": size, "params": int(n), "variant": name, "bytes_per_period": sent,
                   "x_fewer_than_float32": f32 / sent,
                   "largest_step_share": max(frag) / n,
                   "bytes_in_compiled_program": measured})
      print(f"{size:>4s} {name:22s} {sent / 1e6:9.3f} MB per period  "
            f"{f32 / sent:5.2f}x fewer  peak step {max(frag) / n:.2f} of it", flush=True)
  return rows


def overhead_fragments(p0, F):
  from wagrad._src.averaging_exchange import fragments as _fragments
  sizes = [x.size for x in jax.tree_util.tree_leaves(p0)]
  frag = _fragments(p0, F)
  return [sum(s for s, g in zip(sizes, frag) if g == f) for f in range(F)]


def time_part(sizes, backends, taus, steps, rounds):
  rows = []
  for size, backend, tau in [(s, b, t) for s in sizes for b in backends for t in taus]:
    p0 = overhead.init_params(overhead.SIZES[size])
    x, y = batch()
    r = wagrad.Runner(backend, K)
    runs = {}
    for name, kw in VARIANTS.items():
      if kw.get("num_fragments", 1) > tau or kw.get("error_feedback") is False:
        continue
      tx = make_tx(overhead.LR, tau, r.axis_name, **kw)
      f = r.map(_step(tx), donate_argnums=(0, 1))
      state = common.warm_up(lambda p, s: f(p, s, x, y), (r.replicate(p0), r.init(tx, p0)),
                             n=2)
      runs[name] = [f, state, []]
    common.interleaved(runs, rounds, steps, x, y)
    base = np.asarray(runs["float32"][2])
    for name, (_, _, times) in runs.items():
      ratio = np.asarray(times) / base
      rows.append({"size": size, "backend": backend, "tau": tau, "variant": name,
                   "ms_per_step": 1e3 * float(np.median(times)),
                   "x_float32_q25_q50_q75": [float(np.quantile(ratio, q))
                                             for q in (0.25, 0.5, 0.75)]})
      print(f"{size:>4s} {backend:9s} tau={tau:<2d} {name:22s} {1e3 * np.median(times):8.1f} ms  "
            f"x float32 {np.median(ratio):.2f}", flush=True)
  return rows


def accuracy_part(seeds, steps):
  import digits_lib
  for name, kw in VARIANTS.items():
    digits_lib.ALGORITHMS[f"diloco {name}"] = (
        lambda lr, tau, ax, K_, T, seed, opts, kw=kw: digits_lib.Algo(
            make_tx(lr, tau, ax, **kw), "global"), f"DiLoCo, {name}")
  rows = []
  for seed in range(seeds):
    res = digits_lib.train_digits([f"diloco {n}" for n in VARIANTS], workers=K, steps=steps,
                                  sync_period=8, seed=seed, progress=False)
    for r in res:
      rows.append({"seed": seed, "variant": r["algorithm"][len("diloco "):],
                   "test_acc": r["test_acc"]})
      print(f"seed {seed} {r['algorithm']:30s} {r['test_acc']:.4f}", flush=True)
  summary = []
  base = {r["seed"]: r["test_acc"] for r in rows if r["variant"] == "float32"}
  for name in VARIANTS:
    acc = np.asarray([r["test_acc"] for r in rows if r["variant"] == name])
    gap = acc - np.asarray([base[r["seed"]] for r in rows if r["variant"] == name])
    summary.append({"variant": name, "mean_acc": float(acc.mean()),
                    "mean_gap": float(gap.mean()), "min_gap": float(gap.min()),
                    "max_gap": float(gap.max())})
    print(f"{name:22s} mean {acc.mean():.4f}  gap to float32 {gap.mean():+.4f} "
          f"[{gap.min():+.4f}, {gap.max():+.4f}]", flush=True)
  return rows, summary


def plot(data, name):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  if data.get("bytes"):
    rows = [r for r in data["bytes"] if r["size"] == data["bytes"][-1]["size"]]
    axes[0].barh([r["variant"] for r in rows], [r["bytes_per_period"] / 1e6 for r in rows])
    axes[0].set_xlabel(f"MB a worker sends per period ({rows[0]['size']} parameters)")
    axes[0].invert_yaxis()
  if data.get("time"):
    for tau in sorted({r["tau"] for r in data["time"]}):
      rows = [r for r in data["time"] if r["tau"] == tau and r["size"] == "1M"
              and r["backend"] == "shard_map"]
      axes[1].plot([r["variant"] for r in rows], [r["x_float32_q25_q50_q75"][1] for r in rows],
                   marker="o", label=f"tau={tau}")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set_ylabel("step time / float32 (1M, shard_map, 8 CPU devices)")
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend()
  if data.get("accuracy"):
    names = list(VARIANTS)
    for i, n in enumerate(names):
      acc = [r["test_acc"] for r in data["accuracy"] if r["variant"] == n]
      axes[2].scatter([i] * len(acc), acc, s=14)
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[2].set_ylabel("digits test accuracy (per seed)")
  fig.suptitle("DiLoCo exchange: float32, compressed, streaming")
  fig.tight_layout()
  path = os.path.join(common.OUT, name + ".png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--parts", nargs="+", default=["bytes", "time", "accuracy"])
  ap.add_argument("--sizes", nargs="+", default=["1M", "10M"])
  ap.add_argument("--taus", nargs="+", type=int, default=[1, 8])
  ap.add_argument("--backends", nargs="+", default=["shard_map", "vmap"])
  ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--train-steps", type=int, default=300)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  data = {"device": common.device_info(), "workers": K, "args": vars(args)}
  if "bytes" in args.parts:
    data["bytes"] = bytes_part(args.sizes)
  if "time" in args.parts:
    data["time"] = time_part(args.sizes, args.backends, args.taus, args.steps, args.rounds)
  if "accuracy" in args.parts:
    data["accuracy"], data["accuracy_summary"] = accuracy_part(args.seeds, args.train_steps)
  name = args.out or f"exchange_{data['device']['platform']}"
  common.save(name, data)
  plot(data, name)
  return data


if __name__ == "__main__":
  main()
