"""Multi-host start-up over JAX's own runtime (``jax.distributed``).

After :func:`initialize`, ``jax.devices()`` lists every process's devices and
``wagrad.Runner("shard_map", K)`` builds its mesh over all of them: the same per-worker
code then runs across hosts. Each process feeds the same global arrays (or its own
shards via ``jax.make_array_from_process_local_data``); read results back with
``jax.experimental.multihost_utils.process_allgather``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import jax


def _wait_for_coordinator(address: str, timeout_seconds: float) -> bool:
  """True once a TCP connection to ``host:port`` succeeds, False after the timeout."""
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.2)


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               timeout_seconds: int = 60, cpu_collectives: str = "gloo", **kwargs: Any
               ) -> None:
  """``jax.distributed.initialize`` with argument checks and a clear error.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: number of processes (hosts), >= 1.
    process_id: this process's id in ``[0, num_processes)``.
    timeout_seconds: how long to wait for the coordinator and the other processes.
    cpu_collectives: CPU cross-process collectives implementation (``"gloo"``); set
      only when the platform is CPU.
    **kwargs: passed to ``jax.distributed.initialize``.

  Raises:
    ValueError: bad address, count or id.
    ConnectionError: the coordinator could not be reached (or the other processes did
      not join) within ``timeout_seconds``.
  """
  if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
    raise ValueError(f"`coordinator_address` must be 'host:port', got {coordinator_address!r}.")
  if not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"`num_processes` must be an integer >= 1, got {num_processes!r}.")
  if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
    raise ValueError(f"`process_id` must be in [0, {num_processes}), got {process_id!r}.")
  if cpu_collectives and getattr(jax.config, "jax_platforms") in (None, "", "cpu"):
    try:
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except Exception:  # pragma: no cover - option absent in some jax versions
      pass
  # JAX's client aborts the whole process when it cannot reach the coordinator, so the
  # non-coordinator processes check reachability first and raise a normal exception.
  if process_id != 0 and not _wait_for_coordinator(coordinator_address, timeout_seconds):
    raise ConnectionError(
        f"could not join the JAX distributed runtime at {coordinator_address} as process "
        f"{process_id}/{num_processes}: no coordinator answered within {timeout_seconds}s "
        f"(start process 0 first, check the address and the firewall).")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_seconds, **kwargs)
  except Exception as e:  # jax raises RuntimeError / XlaRuntimeError with long text
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConnectionError(
        f"could not join the JAX distributed runtime at {coordinator_address} as process "
        f"{process_id}/{num_processes} within {timeout_seconds}s: {msg}") from e
