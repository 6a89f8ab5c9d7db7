"""How many asynchronous exchanges one master serves, and what it costs while waiting.

    python benchmarks/async_serving.py                 # 8 and 16 workers

A master (``wagrad.async_.serve_easgd``, or S server processes with ``--servers``) and N
worker processes (``EASGDWorker``,
tau = 1, a float32 model of ``--values`` values, no compute): each worker exchanges
``--exchanges`` times as fast as it can (``busy``), then again sleeping ``--gap`` seconds
between exchanges (``paced``: the master mostly waits). Reported: exchanges served per second
(first to last served, all workers together) and the master's CPU seconds per second of
wall time over its whole serving loop (a master that polls burns CPU while it waits).
Writes ``results/async_serving_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from async_transport import OUT, free_port


def _process(rank, n, port, exchanges, gap, values, servers):
  """One process: server ``rank`` (rank < servers) or worker ``rank - servers``."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import numpy as np
  import wagrad
  from wagrad import async_
  wagrad.initialize_distributed(f"127.0.0.1:{port}", n + servers, rank, timeout_seconds=300)
  params = {"w": np.zeros(values, np.float32)}
  if rank < servers:
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    shards = {} if servers == 1 else {"server": rank, "num_servers": servers}
    _, served, gone = async_.serve_easgd(
        params, n, alpha=0.1, timeout_s=300, check_s=10.0,
        callback=lambda c, s: times.append(time.perf_counter()), **shards)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    total = int(served.sum())
    return {"served": total, "gone": list(gone),
            "per_s": (total - 1) / max(times[-1] - times[0], 1e-9),
            "master_cpu_per_wall_s": cpu / wall}
  worker = async_.EASGDWorker(rank - servers, 1, timeout_s=300, num_servers=servers)
  p, zero = params, {"w": np.zeros(values, np.float32)}
  for _ in range(exchanges):
    p = worker.apply_updates(p, zero)
    if gap:
      time.sleep(gap)
  worker.close()
  jax.block_until_ready(p)
  return {}


def _run(n, exchanges, gap, values, servers, timeout_s=900):
  port = free_port()
  env = {**os.environ}
  env.pop("XLA_FLAGS", None)
  cmd = lambda r: [sys.executable, __file__, "--rank", str(r), "--workers", str(n),  # noqa: E731
                   "--port", str(port), "--exchanges", str(exchanges), "--gap", str(gap),
                   "--values", str(values), "--servers", str(servers)]
  others = [subprocess.Popen(cmd(r), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for r in range(1, n + servers)]
  try:
    p = subprocess.run(cmd(0), env=env, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode:
      raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])
  finally:
    for w in others:
      w.kill()
      w.wait()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--workers", type=int, nargs="+", default=[8, 16])
  ap.add_argument("--exchanges", type=int, default=100, help="per worker")
  ap.add_argument("--gap", type=float, default=0.5, help="paced: seconds between exchanges")
  ap.add_argument("--values", type=int, default=1000, help="float32 values in the model")
  ap.add_argument("--modes", nargs="+", default=["busy", "paced"])
  ap.add_argument("--servers", type=int, nargs="+", default=[1],
                  help="server processes of the sharded master (S)")
  ap.add_argument("--label", default="", help="a name for this run in the JSON")
  ap.add_argument("--out", default=OUT)
  ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.rank is not None:  # one process of a run
    print(json.dumps(_process(a.rank, a.workers[0], a.port, a.exchanges, a.gap, a.values,
                              a.servers[0])))
    return 0
  rows = []
  for n in a.workers:
    for S in a.servers:
      for mode in a.modes:
        gap = a.gap if mode == "paced" else 0.0
        r = _run(n, a.exchanges, gap, a.values, S)
        rows.append({"workers": n, "servers": S, "mode": mode, "gap_s": gap,
                     "values": a.values, **r})
        print(f"{n:3d} workers, S={S} {mode:5s}: {r['per_s']:7.0f} exchanges/s served, "
              f"server 0 CPU {r['master_cpu_per_wall_s']:.2f} s/s, {r['served']} served, "
              f"gone {r['gone']}", flush=True)
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "async_serving_cpu.json")
  runs = json.load(open(path)) if os.path.exists(path) else {}
  run = runs.setdefault(a.label or "current", {"exchanges_per_worker": a.exchanges,
                                                "rows": []})
  key = lambda r: (r["workers"], r.get("servers", 1), r["mode"], r["values"])  # noqa: E731
  run["rows"] = [r for r in run["rows"] if key(r) not in {key(x) for x in rows}] + rows
  with open(path, "w") as f:
    json.dump(runs, f, indent=1)
  print(f"wrote {path}")
  _plot(runs, path[:-5] + ".png")
  return 0


def _plot(runs, path):
  """Horizontal bars per (workers, S, mode, values), one colour per run: exchanges served
  per second (log scale) and server 0's CPU."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover
    return
  key = lambda r: (r["values"], r["workers"], r.get("servers", 1), r["mode"])  # noqa: E731
  keys = sorted({key(r) for run in runs.values() for r in run["rows"]})
  fig, axes = plt.subplots(1, 2, figsize=(11, 0.3 * len(keys) * len(runs) + 1.5), sharey=True)
  h = 0.8 / len(runs)
  for ax, field, title in ((axes[0], "per_s", "exchanges served per second"),
                           (axes[1], "master_cpu_per_wall_s", "server 0: CPU s per wall s")):
    for j, (label, run) in enumerate(runs.items()):
      rows = {key(r): r for r in run["rows"]}
      ys = [i + j * h for i, k in enumerate(keys) if k in rows]
      ax.barh(ys, [rows[k][field] for k in keys if k in rows], height=h, label=label)
    ax.set_title(title)
  axes[0].set_xscale("log")
  axes[0].set_yticks([i + 0.4 - h / 2 for i in range(len(keys))],
                     [f"{v:.0e} values, {n} workers, S={S}, {m}" for v, n, S, m in keys])
  axes[0].invert_yaxis()
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  sys.exit(main())
