"""wagrad across real processes against PyTorch's own model averaging and DDP.

N processes on one machine, one single-threaded CPU device (or torch rank) each, over
gloo on loopback; the MLP of ``overhead.py`` (256 -> h -> h -> 10, ReLU, softmax
cross-entropy; 1M: h = 880, 1,010,250 parameters), a fixed synthetic batch of 32 per
worker, plain SGD 0.05. Variants:

* JAX (``wagrad.initialize_distributed``, ``wagrad.Runner("shard_map", N)``, state
  donated, every step waited for): ``local`` (no communication), ``sync_sgd``,
  ``model_averaging tau=1/4/16``, and by hand ``lax.pmean`` of the parameters after
  each SGD step, of the tree (``tree pmean``) or of one flat vector (``flat pmean``);
* PyTorch (``torch.distributed``, gloo): ``local``, ``sync_sgd (DDP)``
  (``DistributedDataParallel``) and ``model_averaging tau=1/4/16``
  (``PeriodicModelAverager`` after each ``optimizer.step()``, averaging on the same
  steps as wagrad).

Reported (process / rank 0): ms per step, median with quartiles, and the mean (for
tau > 1 the median is a step without exchange; the mean spreads the exchanges), and
the largest difference of the first weight matrix between workers after the run (0
when they are kept equal); in ``results/multiprocess_cpu.json`` and ``.png``.

    python benchmarks/multiprocess.py --processes 8 --size 1M --rounds 4
    python benchmarks/multiprocess.py --processes 2 --size tiny --rounds 1 --skip-torch
    python benchmarks/link.py --link 1gbit -- python benchmarks/multiprocess.py \
        --skip-torch --compression bfloat16 int8 --variants "local|averaging tau=(1|16)" \
        --out multiprocess_1gbit_cpu          # over a shaped link (benchmarks/link.py)

PyTorch is optional (``pip install -e '.[bench]'``; not a wagrad dependency): without
it only the JAX half runs. ``MP_HLO_DIR=dir`` makes process 0 write each variant's
compiled program there (to read which collectives it runs).
Every worker is killed (SIGKILL) at ``--deadline`` seconds; what was measured is kept.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

LR, BATCH, IN, OUT_DIM = 0.05, 32, 256, 10
TAUS = (1, 4, 16)
WARMUP = max(TAUS)  # untimed steps: every variant has exchanged once (the first is slow)
ROUND = max(TAUS)   # steps per variant per interleaved round: every tau divides it
SIZES = {"tiny": 16, "1M": 880}  # name -> hidden width
JAX_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def init_params(hidden, seed=0):  # as overhead.py
  rng = np.random.default_rng(seed)
  dims = [(IN, hidden), (hidden, hidden), (hidden, OUT_DIM)]
  return {f"layer{i}": {"w": (rng.normal(size=d) / np.sqrt(d[0])).astype(np.float32),
                        "b": np.zeros(d[1], np.float32)} for i, d in enumerate(dims)}


def data(n):
  """Every worker's fixed batch, stacked: x (n, BATCH, IN), y (n, BATCH)."""
  rng = np.random.default_rng(1)
  return (rng.normal(size=(n, BATCH, IN)).astype(np.float32),
          rng.integers(0, OUT_DIM, size=(n, BATCH)).astype(np.int32))


def summary(name, seconds, spread):
  ms = 1e3 * np.asarray(seconds)
  q25, q50, q75 = (float(np.percentile(ms, q)) for q in (25, 50, 75))
  return {"variant": name, "median_ms": q50, "q25_ms": q25, "q75_ms": q75,
          "mean_ms": float(ms.mean()), "worker_spread": float(spread)}


def write_rows(path, rows):
  with open(path, "w") as f:
    json.dump(rows, f, indent=1)


# ------------------------------------------------------------------ JAX worker

def jax_worker(a):
  import jax
  import jax.numpy as jnp
  import optax
  from jax import lax
  from jax.experimental import multihost_utils

  import wagrad

  wagrad.initialize_distributed(f"127.0.0.1:{a.port}", a.processes, a.rank, timeout_seconds=120)
  assert jax.process_count() == a.processes and jax.local_device_count() == 1
  runner = wagrad.Runner("shard_map", a.processes)
  ax = runner.axis_name
  p0 = init_params(SIZES[a.size])
  x, y = data(a.processes)  # the same global arrays in every process: each keeps its row
  x, y = runner.put(x), runner.put(y)
  sgd = optax.sgd(LR)

  def loss_fn(p, x, y):
    h = x
    for i in range(3):
      h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
      h = jax.nn.relu(h) if i < 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

  def flat_pmean(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    flat = lax.pmean(jnp.concatenate([l.ravel() for l in leaves]), ax)
    out, off = [], 0
    for l in leaves:
      out.append(flat[off:off + l.size].reshape(l.shape))
      off += l.size
    return jax.tree_util.tree_unflatten(treedef, out)

  def hand(exchange, grads_fn=lambda g: g):
    def step(p, s, x, y):
      g = grads_fn(jax.grad(loss_fn)(p, x, y))
      u, s = sgd.update(g, s, p)
      return exchange(optax.apply_updates(p, u)), s
    return step, sgd

  def transform(tx):
    def step(p, s, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p, value=loss)
      return wagrad.apply_updates(p, u, s), s
    return step, tx

  variants = {"local": hand(lambda p: p),
              "sync_sgd": transform(wagrad.sync_sgd(sgd, axis_name=ax))}
  for tau in TAUS:
    variants[f"model_averaging tau={tau}"] = transform(
        wagrad.model_averaging(sgd, sync_period=tau, axis_name=ax))
  variants["hand sync_sgd, flat pmean"] = hand(lambda p: p, grads_fn=flat_pmean)
  variants["hand averaging tau=1, tree pmean"] = hand(lambda p: lax.pmean(p, ax))
  variants["hand averaging tau=1, flat pmean"] = hand(flat_pmean)
  for c in a.compression:
    for tau in (1, max(TAUS)):
      variants[f"model_averaging tau={tau} {c}"] = transform(
          wagrad.model_averaging(sgd, sync_period=tau, compression=c, axis_name=ax))
  if a.variants:
    variants = {k: v for k, v in variants.items() if re.search(a.variants, k)}

  runs = {}
  for name, (step, tx) in variants.items():  # compile and warm up every variant first
    f = runner.map(step, donate_argnums=(0, 1))
    p, s = runner.replicate(p0), runner.init(tx, p0)
    if os.environ.get("MP_HLO_DIR") and a.rank == 0:  # inspect the compiled collectives
      with open(os.path.join(os.environ["MP_HLO_DIR"], name.replace(" ", "_") + ".txt"), "w") as fh:
        fh.write(f.lower(p, s, x, y).compile().as_text())
    for _ in range(WARMUP):
      p, s = jax.block_until_ready(f(p, s, x, y))
    runs[name] = [f, (p, s), []]

  def one_round(name):
    f, (p, s), times = runs[name]
    for _ in range(ROUND):
      t0 = time.perf_counter()
      p, s = jax.block_until_ready(f(p, s, x, y))
      times.append(time.perf_counter() - t0)
    runs[name][1] = (p, s)

  interleave(a, list(runs), one_round, lambda name: (
      runs[name][2], np.asarray(multihost_utils.process_allgather(
          runs[name][1][0]["layer0"]["w"], tiled=True))), "jax")


def interleave(a, names, one_round, result, label):
  """Time the variants in ``a.rounds`` interleaved rounds of ``ROUND`` steps each (every
  variant sees the same machine state: the first collective program run in a process
  group was measured up to 30x slower than later ones); rows as :func:`summary`."""
  for _ in range(a.rounds):
    for name in names:
      one_round(name)
  rows = []
  for name in names:
    times, w = result(name)
    rows.append(summary(name, times, np.abs(w - w[0]).max()))
    if a.rank == 0:
      print(f"  {label:5s} {name:34s} {rows[-1]['median_ms']:8.2f} ms", flush=True)
  if a.rank == 0:
    write_rows(a.tmp, rows)
  return rows


# ------------------------------------------------------------------ PyTorch worker

def torch_worker(a):
  import torch
  import torch.distributed as dist
  from torch import nn
  from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank,
                          world_size=a.processes)
  p0 = init_params(SIZES[a.size])
  xs, ys = data(a.processes)
  x, y = torch.from_numpy(xs[a.rank]), torch.from_numpy(ys[a.rank]).long()

  def model():
    h = SIZES[a.size]
    m = nn.Sequential(nn.Linear(IN, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                      nn.Linear(h, OUT_DIM))
    with torch.no_grad():  # the JAX side's initial parameters
      for i, lin in enumerate(m[::2]):
        lin.weight.copy_(torch.from_numpy(p0[f"layer{i}"]["w"].T))
        lin.bias.copy_(torch.from_numpy(p0[f"layer{i}"]["b"]))
    return m

  variants = {"local": None, "sync_sgd (DDP)": "ddp"}
  variants.update({f"model_averaging tau={t}": t for t in TAUS})
  runs = {}
  for name, kind in variants.items():
    m = model()
    net = nn.parallel.DistributedDataParallel(m) if kind == "ddp" else m
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    # warmup_steps = tau - 1: averages after steps tau, 2 tau, ... as wagrad does (0 would
    # average after steps 1, tau + 1, ...: the same period, one step earlier)
    avg = (PeriodicModelAverager(period=kind, warmup_steps=kind - 1) if isinstance(kind, int)
           else None)
    runs[name] = (m, net, opt, avg, [])

  def step(name):
    m, net, opt, avg, times = runs[name]
    t0 = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    if avg is not None:
      avg.average_parameters(net.parameters())
    return time.perf_counter() - t0

  for name in runs:
    for _ in range(WARMUP):
      step(name)

  def one_round(name):
    runs[name][-1].extend(step(name) for _ in range(ROUND))

  def result(name):
    w = runs[name][0][0].weight.detach()
    ws = [torch.empty_like(w) for _ in range(a.processes)]
    dist.all_gather(ws, w)
    return runs[name][-1], np.stack([v.numpy() for v in ws])

  interleave(a, list(runs), one_round, result, "torch")
  dist.destroy_process_group()


# ------------------------------------------------------------------ launcher

def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(group, a, tmpdir):
  """Run the N workers of ``group``; returns (status, rank 0's rows or None)."""
  port, out = free_port(), os.path.join(tmpdir, f"{group}.json")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=JAX_XLA_FLAGS, OMP_NUM_THREADS="1")
  procs, logs = [], []
  for i in range(a.processes):
    logs.append(open(os.path.join(tmpdir, f"{group}{i}.log"), "w+"))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", group, "--rank", str(i),
           "--port", str(port), "--tmp", out, "--processes", str(a.processes),
           "--size", a.size, "--rounds", str(a.rounds), "--variants", a.variants or "",
           "--compression", *a.compression]
    procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  t0, status = time.monotonic(), "ok"
  while any(p.poll() is None for p in procs):
    failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
    if failed or time.monotonic() - t0 > a.deadline:
      status = (f"process {failed[0]} failed (rc {procs[failed[0]].returncode})" if failed
                else f"timed out after {a.deadline:.0f} s")
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()  # SIGKILL: a hung JAX process ignores SIGTERM
    p.wait()
  if status == "ok" and any(p.returncode for p in procs):
    status = "failed (rc " + ",".join(str(p.returncode) for p in procs) + ")"
  print(f"{group}: {status} in {time.monotonic() - t0:.1f} s", flush=True)
  for i, log in enumerate(logs):
    log.seek(0)
    if status != "ok":
      print(f"--- {group} process {i}, end of log:\n{log.read()[-1500:]}")
    log.close()
  if not os.path.exists(out):
    return status, None
  with open(out) as f:
    return status, json.load(f)


def paired(data):
  """Variant names (JAX's order) and each framework's rows by name ("sync_sgd (DDP)"
  pairs with "sync_sgd")."""
  by = {fw: {r["variant"].replace(" (DDP)", ""): r for r in data[fw]["rows"] or []}
        for fw in ("jax", "torch")}
  return list(by["jax"]) + [n for n in by["torch"] if n not in by["jax"]], by


def plot(data, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names, by = paired(data)
  pos = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.5))
  for off, label, rows, color in ((-0.2, "JAX + wagrad", by["jax"], "tab:blue"),
                                  (0.2, "PyTorch", by["torch"], "tab:orange")):
    ys = [p + off for p, n in zip(pos, names) if n in rows]
    rs = [rows[n] for n in names if n in rows]
    if rs:
      med = np.array([r["median_ms"] for r in rs])
      err = [med - [r["q25_ms"] for r in rs], [r["q75_ms"] for r in rs] - med]
      ax.barh(ys, med, height=0.4, xerr=err, color=color, label=label)
      ax.plot([r["mean_ms"] for r in rs], ys, "k.", label="mean" if off < 0 else None)
  ax.set_yticks(pos, [n + (" (torch: DDP)" if n == "sync_sgd" else "") for n in names])
  ax.invert_yaxis()
  ax.set_xlabel("ms per step (bars: median and quartiles; dots: mean)")
  ax.set_title(f"{data['processes']} processes x 1 CPU thread, gloo on loopback, "
               f"{data['size']} ({data['params']:,} params)", fontsize=9)
  if ax.patches:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--processes", type=int, default=8)
  ap.add_argument("--size", default="1M", choices=list(SIZES))
  ap.add_argument("--rounds", type=int, default=4,
                  help=f"interleaved rounds of {ROUND} timed steps per variant")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--out", default="multiprocess_cpu", help="results name (JSON and PNG)")
  ap.add_argument("--deadline", type=float, default=600, help="seconds per group of workers")
  ap.add_argument("--compression", nargs="*", default=[], choices=["bfloat16", "int8"],
                  help="also model averaging at tau 1 and 16 with these compressions")
  ap.add_argument("--variants", default="", help="only the JAX variants matching this regex")
  ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--tmp", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    return (jax_worker if a.worker == "jax" else torch_worker)(a)

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import common
  import jax
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
    if not a.skip_torch:
      print("PyTorch is not installed (`pip install torch`): running the JAX half only.")
  p0 = init_params(SIZES[a.size])
  data = {"processes": a.processes, "size": a.size, "hidden": SIZES[a.size],
          "params": int(sum(l.size for d in p0.values() for l in d.values())),
          "batch_per_worker": BATCH, "lr": LR, "rounds": a.rounds, "steps_per_round": ROUND,
          "warmup_steps": WARMUP,
          "threads": {"jax_XLA_FLAGS": JAX_XLA_FLAGS, "torch_num_threads": 1,
                      "OMP_NUM_THREADS": "1"},
          "jax_version": jax.__version__, "torch_version": torch_version,
          "cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmpdir:
    print(f"== JAX: {a.processes} processes, {a.size}, {a.rounds} interleaved rounds of {ROUND} steps per variant", flush=True)
    status, rows = launch("jax", a, tmpdir)
    data["jax"] = {"status": status, "rows": rows}
    data["torch"] = {"status": "skipped", "rows": None}
    if torch_version and not a.skip_torch:
      print(f"== PyTorch {torch_version}: {a.processes} processes", flush=True)
      status, rows = launch("torch", a, tmpdir)
      data["torch"] = {"status": status, "rows": rows}
  common.save(a.out, data)
  plot(data, os.path.join(common.OUT, a.out + ".png"))
  names, by = paired(data)
  print(f"\nms per step, median (mean)\n{'variant':34s} {'JAX':>16s} {'PyTorch':>16s}")
  for n in names:
    cells = [f"{r['median_ms']:.2f} ({r['mean_ms']:.2f})" if r else "-"
             for r in (by["jax"].get(n), by["torch"].get(n))]
    print(f"{n:34s} {cells[0]:>16s} {cells[1]:>16s}")
  return data


if __name__ == "__main__":
  main()
