"""What one asynchronous exchange's messages cost between two processes on this host:
wagrad's transport (``wagrad._src.bulk``) on JAX's transfer server and on the
coordination-service store it replaced, against a plain loopback TCP socket moving the
same bytes (the floor), and against JAX's transfer server alone (``raw``: arrays already
on the device, only their address and id through the store).

    python benchmarks/async_transport.py            # 1M, 10M, 50M float32 values

Process 0 sends a float32 array of n values and waits for the reply; process 1 answers
with an array of the same size (an exchange's round trip: the worker's parameters to
the master, the answer back). Median of ``--reps`` round trips after one untimed one.
Writes ``results/async_transport_cpu.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("WAGRAD_BENCH_OUT") or os.path.join(HERE, "results")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wagrad_side(rank, port, n, reps):
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, rank)
  jax.devices()
  from wagrad._src import bulk, kvstore
  like = {"w": np.zeros(n, np.float32)}
  times = []
  for r in range(reps + 1):
    t0 = time.perf_counter()
    if rank == 0:
      bulk.send(f"bench/req/{r}", {"w": np.full(n, r, np.float32)})
      assert bulk.receive(f"bench/resp/{r}", like, 600)["w"][-1] == r
      kvstore.delete(f"bench/resp/{r}")
    else:
      x = bulk.receive(f"bench/req/{r}", like, 600)
      kvstore.delete(f"bench/req/{r}")
      bulk.send(f"bench/resp/{r}", x)
    times.append(time.perf_counter() - t0)
  kvstore.barrier("bench/end", 600)
  return times[1:]


def _raw_side(rank, port, n, reps):
  """JAX's transfer server alone: the array already on the device, only its (address,
  id) through the store; the floor under wagrad's transfer path."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  from jax.experimental import transfer
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, rank)
  from wagrad._src import kvstore
  dev = jax.local_devices()[0]
  server = transfer.start_transfer_server(dev.client, "127.0.0.1:0", ["127.0.0.1:0"])
  kvstore.put(f"raw/address/{rank}", server.address().encode())
  conn = server.connect(kvstore.get(f"raw/address/{1 - rank}", 600).decode())
  spec = [jax.ShapeDtypeStruct((n,), np.float32,
                               sharding=jax.sharding.SingleDeviceSharding(dev))]
  arrays = [jax.device_put(np.full(n, r, np.float32), dev) for r in range(reps + 1)]
  times = []
  for r in range(reps + 1):
    t0 = time.perf_counter()
    if rank == 0:
      server.await_pull(2 * r, [arrays[r]])
      kvstore.put(f"raw/req/{r}", b"1")
      kvstore.get(f"raw/resp/{r}", 600)
      (back,) = conn.pull(2 * r + 1, spec)
      assert float(back[-1]) == r
    else:
      kvstore.get(f"raw/req/{r}", 600)
      (x,) = conn.pull(2 * r, spec)
      x.block_until_ready()
      server.await_pull(2 * r + 1, [x])
      kvstore.put(f"raw/resp/{r}", b"1")
    times.append(time.perf_counter() - t0)
  kvstore.barrier("bench/end", 600)
  return times[1:]


def _recv_exactly(conn, size):
  buf = bytearray(size)
  view, got = memoryview(buf), 0
  while got < size:
    k = conn.recv_into(view[got:])
    if not k:
      raise ConnectionError("peer closed")
    got += k
  return buf


def _socket_side(rank, port, n, reps):
  size = 4 * n
  if rank == 1:
    with socket.create_server(("127.0.0.1", port)) as srv:
      conn, _ = srv.accept()
      with conn:
        for _ in range(reps + 1):
          conn.sendall(_recv_exactly(conn, size))
    return []
  for _ in range(100):
    try:
      conn = socket.create_connection(("127.0.0.1", port))
      break
    except OSError:
      time.sleep(0.05)
  times = []
  with conn:
    for r in range(reps + 1):
      data = np.full(n, r, np.float32)
      t0 = time.perf_counter()
      conn.sendall(memoryview(data).cast("B"))
      back = np.frombuffer(_recv_exactly(conn, size), np.float32)
      times.append(time.perf_counter() - t0)
      assert back[-1] == r
  return times[1:]


def _pair(transport, n, reps, timeout_s=900):
  """Run both sides as processes; process 0's round-trip times."""
  port = free_port()
  env = {**os.environ, "WAGRAD_TRANSPORT": transport}
  env.pop("XLA_FLAGS", None)
  cmd = lambda r: [sys.executable, __file__, "--side", transport, "--rank", str(r),  # noqa: E731
                   "--port", str(port), "--n", str(n), "--reps", str(reps)]
  helper = subprocess.Popen(cmd(1), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  try:
    p = subprocess.run(cmd(0), env=env, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode:
      raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])
  finally:
    helper.kill()
    helper.wait()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000],
                  help="float32 values per message")
  ap.add_argument("--reps", type=int, default=5, help="timed round trips per size")
  ap.add_argument("--transports", nargs="+", default=["socket", "raw", "transfer", "store"])
  ap.add_argument("--out", default=OUT)
  ap.add_argument("--side", help=argparse.SUPPRESS)
  ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.side:  # one side of a pair
    side = {"socket": _socket_side, "raw": _raw_side}.get(a.side, _wagrad_side)
    print(json.dumps(side(a.rank, a.port, a.n, a.reps)))
    return 0
  rows = []
  for n in a.sizes:
    for t in a.transports:
      times = _pair(t, n, a.reps)
      med = float(np.median(times))
      rows.append({"transport": t, "values": n, "megabytes": 4 * n / 1e6,
                   "round_trip_s": med, "spread_s": [min(times), max(times)]})
      print(f"{n:>11,d} values  {t:9s} round trip {med * 1000:9.1f} ms "
            f"({2 * 4 * n / 1e6 / med:7.0f} MB/s both ways)", flush=True)
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "async_transport_cpu.json")
  with open(path, "w") as f:
    json.dump({"cpu_count": os.cpu_count(), "reps": a.reps, "rows": rows}, f, indent=1)
  print(f"wrote {path}")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in a.transports:
      r = [x for x in rows if x["transport"] == t]
      ax.loglog([x["megabytes"] for x in r], [x["round_trip_s"] * 1000 for x in r], "o-",
                label={"socket": "loopback socket (floor)",
                       "raw": "JAX transfer server alone (device arrays)",
                       "transfer": "wagrad, transfer server",
                       "store": "wagrad, coordination store"}[t])
    ax.set_xlabel("message size (MB, each way)")
    ax.set_ylabel("round trip (ms)")
    ax.set_title("One asynchronous exchange between two processes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path[:-5] + ".png", dpi=120)
  except ImportError:  # pragma: no cover
    pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
