"""JAX's coordination-service key-value store: the one place wagrad reaches a private
JAX API (``jax._src.distributed.global_state.client``).

After ``wagrad.initialize_distributed`` every process holds a client of the store that
process 0's coordination service keeps. The asynchronous multi-process algorithms
(:mod:`wagrad.async_`) keep their protocol in it: a worker writes its message under a
key of its own and reads the answer under another; nothing waits for the other workers.
A message's arrays travel on JAX's transfer server (:mod:`wagrad._src.bulk`), the key
holding only where to pull them; without a transfer server they travel here as raw
bytes of their leaves in tree order (both sides know the tree).

Checked with jax 0.8 to 0.10: ``key_value_set_bytes`` (``allow_overwrite``),
``key_value_try_get_bytes``, ``blocking_key_value_get_bytes`` (timeout in ms),
``key_value_dir_get_bytes``, ``key_value_delete``, ``key_value_increment``,
``get_live_nodes``, ``wait_at_barrier``.
"""

from __future__ import annotations

import jax
import numpy as np

_NEEDED = ("key_value_set_bytes", "key_value_try_get_bytes", "blocking_key_value_get_bytes",
           "key_value_dir_get_bytes", "key_value_delete", "key_value_increment",
           "get_live_nodes")


def client():
  """The coordination service's client of this process; a clear error when JAX's
  distributed runtime is not initialised or its store lacks a call wagrad needs."""
  try:
    from jax._src import distributed
    c = distributed.global_state.client
  except Exception as e:  # pragma: no cover - layout of a future jax
    raise RuntimeError(f"wagrad's multi-process asynchronous mode needs JAX's "
                       f"coordination-service store, not found in jax {jax.__version__} "
                       f"({e}); use jax 0.8 to 0.10.") from e
  if c is None:
    raise RuntimeError("JAX's distributed runtime is not initialised: call "
                       "wagrad.initialize_distributed(address, num_processes, process_id) "
                       "in every process first.")
  missing = [m for m in _NEEDED if not hasattr(c, m)]
  if missing:  # pragma: no cover - a future jax
    raise RuntimeError(f"JAX {jax.__version__}'s coordination-service client lacks "
                       f"{missing}: wagrad's asynchronous mode was checked with jax 0.8 to 0.10.")
  return c


def coordinator_host() -> str | None:
  """The host of JAX's coordinator this process joined (None before it joined)."""
  from jax._src import distributed
  address = getattr(distributed.global_state, "coordinator_address", None)
  return address.rsplit(":", 1)[0].strip("[]") if address else None


def pack(tree) -> bytes:
  """The leaves of ``tree`` as one byte string (each leaf's raw bytes, in tree order)."""
  return b"".join(np.ascontiguousarray(np.asarray(x)).tobytes()
                  for x in jax.tree_util.tree_leaves(tree))


def unpack(data: bytes, like):
  """Inverse of :func:`pack`: a tree shaped as ``like`` (NumPy leaves)."""
  leaves, treedef = jax.tree_util.tree_flatten(like)
  out, off = [], 0
  for x in leaves:
    x = np.asarray(x)
    out.append(np.frombuffer(data, x.dtype, x.size, off).reshape(x.shape).copy())
    off += x.nbytes
  if off != len(data):
    raise ValueError(f"message of {len(data)} bytes does not match the tree ({off} bytes).")
  return jax.tree_util.tree_unflatten(treedef, out)


def put(key: str, data: bytes):
  client().key_value_set_bytes(key, data, allow_overwrite=True)


def get(key: str, timeout_s: float) -> bytes:
  """Wait for ``key``; ``TimeoutError`` naming it after ``timeout_s`` seconds."""
  try:
    return client().blocking_key_value_get_bytes(key, int(timeout_s * 1000))
  except Exception as e:
    if "DEADLINE" in str(e).upper() or "TIMED OUT" in str(e).upper():
      raise TimeoutError(f"no value under {key!r} within {timeout_s} s (is the process "
                         f"that writes it alive?).") from e
    raise


def try_get(key: str):
  """The bytes under ``key``, or None when there are none (does not wait)."""
  try:
    return client().key_value_try_get_bytes(key)
  except Exception as e:
    if "NOT_FOUND" in str(e) or "not found" in str(e):
      return None
    raise


def listing(prefix: str) -> list:
  """``(key, bytes)`` of every key under ``prefix`` (sorted by key)."""
  return sorted(client().key_value_dir_get_bytes(prefix))


def increment(key: str) -> int:
  """Add one to the counter under ``key`` (atomically, 0 when absent); the new value."""
  return int(client().key_value_increment(key, 1))


def delete(key: str):
  client().key_value_delete(key)


def live(process_ids) -> set:
  """The processes among ``process_ids`` that the coordination service sees alive (the
  service wants the asking process in the list: it is added). It blocks until every
  live process in the list has called it too, or has left: use it to wait for the
  others to leave, not to ask alone whether one is alive (heartbeats do that)."""
  me = jax.process_index()
  return set(client().get_live_nodes(sorted(set(process_ids) | {me}))) - {me}


def barrier(name: str, timeout_s: float):
  """Wait until every process has reached the barrier ``name``."""
  client().wait_at_barrier(name, int(timeout_s * 1000))
