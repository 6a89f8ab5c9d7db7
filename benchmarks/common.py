"""Shared pieces of the benchmarks: forced CPU devices, a small Flax model, timing."""
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

OUT = os.environ.get("WAGRAD_BENCH_OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results")


def device_info():
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "cpu_count": os.cpu_count()}


def save(name, data):
  os.makedirs(OUT, exist_ok=True)
  path = os.path.join(OUT, name + ".json")
  with open(path, "w") as f:
    json.dump(data, f, indent=1)
  print(f"wrote {path}")
  return path


def warm_up(f, state, n=3):
  """Compile ``f`` and run it ``n`` times (not timed); returns the state after."""
  for _ in range(n):
    state = jax.block_until_ready(f(*state))
  return state


def median_call_seconds(f, args, calls, reps):
  """Median over ``reps`` of the seconds per call of ``f(*args)`` over ``calls`` calls,
  waiting for each; one untimed call first (compiles)."""
  jax.block_until_ready(f(*args))
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(f(*args))
    out.append((time.perf_counter() - t0) / calls)
  return float(np.median(out))


def interleaved(runs, rounds, steps, *args):
  """Time the variants in turn: ``rounds`` times, each run ``[f, state, times]`` takes
  ``steps`` steps of ``state = f(*state, *args)`` (each waited for) and appends its
  seconds per step to ``times``; every variant sees the same machine load per round."""
  for _ in range(rounds):
    for run in runs.values():
      f, state, times = run
      t0 = time.perf_counter()
      for _ in range(steps):
        state = jax.block_until_ready(f(*state, *args))
      times.append((time.perf_counter() - t0) / steps)
      run[1] = state


def time_steps(f, state, n):
  """Seconds per step of ``state = f(*state)`` over n steps, waiting for each step."""
  t0 = time.perf_counter()
  for _ in range(n):
    state = jax.block_until_ready(f(*state))
  return (time.perf_counter() - t0) / n, state


_DT = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s64": 8, "u8": 1,
       "s8": 1, "u16": 2, "s16": 2, "u64": 8}
_SHAPE = re.compile(r"\b(f32|f64|bf16|f16|s32|u32|pred|s64|u8|s8|u16|s16|u64)\[([0-9,]*)\]")


def _bytes_of(shape_text):
  total = 0
  for dt, dims in _SHAPE.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DT[dt]
  return total


_WIRE = {"all-reduce": lambda K: 2 * (K - 1) / K, "all-gather": lambda K: (K - 1) / K,
         "reduce-scatter": lambda K: K - 1, "all-to-all": lambda K: (K - 1) / K,
         "collective-permute": lambda K: 1.0}


def wire_bytes(by_kind, K):
  """Bytes one of K workers sends for collectives whose results total ``by_kind``
  ({kind: bytes}, as :func:`collective_bytes` reads them), with ring algorithms: an
  all-reduce sends 2 (K-1)/K of its result, an all-gather or all-to-all (K-1)/K, a
  reduce-scatter K-1 times its result."""
  return sum(_WIRE[k](K) * b for k, b in by_kind.items())


def collective_bytes(hlo_text):
  """Bytes produced by collectives in a compiled HLO module, split into the entry
  computation (run every step) and other computations (conditional branches, run only
  when taken). Returns {"every_step": {...}, "in_branches": {...}} by op kind."""
  out = {"every_step": {}, "in_branches": {}}
  comp = None
  entry = False
  for line in hlo_text.splitlines():
    s = re.sub(r"/\*.*?\*/", "", line.strip())  # drop /*index=5*/ comments in tuple shapes
    if s.endswith("{") and ("ENTRY" in s or re.match(r"^[%\w.\-]+ ", s)):
      entry = s.startswith("ENTRY")
      comp = s
      continue
    m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
                  r"collective-permute)(-start)?\(", s)
    if m and comp is not None:
      kind = m.group(2)
      key = "every_step" if entry else "in_branches"
      out[key][kind] = out[key].get(kind, 0) + _bytes_of(m.group(1))
  return out
