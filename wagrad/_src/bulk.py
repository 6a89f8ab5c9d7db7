"""Parameter-sized messages between processes on JAX's transfer server, with only a
small control message in the coordination-service store (design.md, Asynchronous
processes).

``send(key, tree)`` offers the tree's arrays on this process's transfer server
(``jax.experimental.transfer``: device to device on GPUs, TCP on CPU) under a fresh
id and writes ``(address, id)`` under ``key``; ``receive(key, like, timeout_s)`` reads
that control message and pulls the arrays from the sender. The store, built for small
control messages, carried the whole model before (about 40 MB/s on loopback).

Where the transfer server is missing (a jax without ``jax.experimental.transfer``) or
does not start, the tree's bytes go through the store as before, after one warning;
``WAGRAD_TRANSPORT=store`` asks for that path.
"""

from __future__ import annotations

import datetime
import inspect
import itertools
import os
import socket
import struct
import warnings

import jax
import numpy as np

from wagrad._src import kvstore

_MAGIC = b"WGTX"  # a control message: magic, 8-byte id, the sender's address
_state: dict = {}  # this process's transfer server, its connections, the id counter


def _host() -> str:
  """The address other processes reach this one at: the interface toward JAX's
  coordinator (loopback when the coordinator is local)."""
  host = kvstore.coordinator_host() or "127.0.0.1"
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
      s.connect((host, 9))  # no packet is sent: this only picks the route
      return s.getsockname()[0]
  except OSError:
    return "127.0.0.1"


def _server():
  """This process's transfer server, started on first use; None on the store path."""
  if "server" not in _state:
    _state["server"] = None
    if os.environ.get("WAGRAD_TRANSPORT", "transfer") != "store":
      try:
        from jax.experimental import transfer
        host = _host()
        _state["server"] = transfer.start_transfer_server(
            jax.local_devices()[0].client, f"{host}:0", [f"{host}:0"])
      except Exception as e:  # pragma: no cover - a jax without the transfer server
        warnings.warn(f"wagrad: JAX's transfer server is not available in jax "
                      f"{jax.__version__} ({e}); parameter-sized messages go through "
                      f"the coordination-service store, which is much slower.")
    _state["ids"] = itertools.count(1)
    _state["connections"] = {}
  return _state["server"]


# A host buffer aligned to 64 bytes is taken by jax.device_put on CPU without a copy
# (measured: 0.05 ms instead of 18 ms for 40 MB; benchmarks/async_transport.py).
_ALIGN = 64


def _flat(tree) -> np.ndarray:
  """The leaves' bytes in tree order, one uint8 buffer aligned to ``_ALIGN`` bytes (one
  copy)."""
  leaves = [np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
            for x in jax.tree_util.tree_leaves(tree)]
  size = sum(leaf.size for leaf in leaves)
  raw = np.empty(size + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  flat = raw[start:start + size]
  if leaves:
    np.concatenate(leaves, out=flat)
  return flat


def _unflat(flat: np.ndarray, like):
  """Inverse of :func:`_flat`: views of ``flat`` shaped as ``like``'s leaves."""
  leaves, treedef = jax.tree_util.tree_flatten(like)
  out, off = [], 0
  for x in leaves:
    x = np.asarray(x)
    out.append(flat[off:off + x.nbytes].view(x.dtype).reshape(x.shape))
    off += x.nbytes
  if off != flat.size:
    raise ValueError(f"message of {flat.size} bytes does not match the tree ({off} bytes).")
  return jax.tree_util.tree_unflatten(treedef, out)


def encode(tree) -> bytes:
  """The message that makes ``tree`` (arrays) readable by :func:`decode`: a control
  message naming it on this process's transfer server, or its bytes on the store path.
  It travels as one flat buffer of its leaves' bytes (design.md, Plain state, flat
  messages), so every dtype arrives exactly as sent."""
  flat = _flat(tree)
  server = _server()
  if server is None:
    return flat.tobytes()
  uid = (jax.process_index() << 40) | next(_state["ids"])
  server.await_pull(uid, [jax.device_put(flat, jax.local_devices()[0])])
  return _MAGIC + struct.pack("<qq", uid, flat.size) + server.address().encode()


def send(key: str, tree) -> None:
  """Make ``tree`` readable by :func:`receive` under ``key`` (:func:`encode`)."""
  kvstore.put(key, encode(tree))


def decode(data: bytes, like, timeout_s: float):
  """The tree a message under a key holds (NumPy leaves shaped as ``like``): pulled
  from its sender for a control message, unpacked for store bytes."""
  if not data.startswith(_MAGIC):
    return kvstore.unpack(data, like)
  uid, size = struct.unpack("<qq", data[4:20])
  address = data[20:].decode()
  connections = _state.setdefault("connections", {})
  if address not in connections:
    server = _server()
    if server is None:  # pragma: no cover - a sender with a server, a receiver without
      raise RuntimeError("a message came on JAX's transfer server but this process has "
                         "none: use the same wagrad, jax and WAGRAD_TRANSPORT everywhere.")
    connections[address] = server.connect(address)
  spec = jax.ShapeDtypeStruct((size,), np.uint8, sharding=jax.sharding.SingleDeviceSharding(
      jax.local_devices()[0]))
  pull = connections[address].pull
  try:
    if "timeout" in inspect.signature(pull).parameters:  # jax >= 0.9; 0.8 waits
      deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
      (buf,) = pull(uid, [spec], timeout=deadline)
    else:  # pragma: no cover - jax 0.8
      (buf,) = pull(uid, [spec])
    buf = np.asarray(buf)
  except Exception:
    connections.pop(address, None)  # a sender that died: connect afresh next time
    raise
  return _unflat(buf, like)


def receive(key: str, like, timeout_s: float):
  """Wait for the message under ``key`` and return its tree (see :func:`decode`)."""
  return decode(kvstore.get(key, timeout_s), like, timeout_s)
