"""Compressed exchange: the mean over workers of a tree, sent in bfloat16 or int8.

The one place where wagrad sends anything but full float32 trees. The mean is a
reduce-scatter then an all-gather of quantized chunks (as OpenDiLoCo's int8
all-reduce and torchft's quantized all-reduce do), so that every byte on the wire is
compressed::

    c_i = d_i + e_i                         (error feedback: e_i is worker i's residual)
    q_i = Q(c_i)                            (flattened, padded to K chunks of whole blocks)
    chunk k of every q_i -> worker k        (all-to-all)
    m_k = sum_i include_i deQ(q_i[k]) / sum_i include_i      (float32 sum on worker k)
    every Q(m_k) -> every worker            (all-gather: the same bytes everywhere)
    mean = deQ(Q(m)),  e_i <- c_i - deQ(q_i)

``Q`` is a cast to bfloat16, or int8 with one float32 scale per block of
:data:`BLOCK` values (``scale = max|x| / 127``, ``q = round(x / scale)``). Bytes a
worker sends per exchange (ring algorithms): ``2 (K-1)/K N b`` with ``b`` = 2 (bf16) or
``1 + 4 / BLOCK`` (int8), against ``2 (K-1)/K N 4`` for a float32 all-reduce. The
re-quantization of the reduced chunk has no feedback (it is the same on every worker).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

MODES = ("bfloat16", "int8")
BLOCK = 256  # int8: values per float32 scale


def check_mode(compression: Any) -> None:
  if compression is not None and compression not in MODES:
    raise ValueError(f"unknown `compression` {compression!r}; choose None (float32), "
                     f"{' or '.join(repr(m) for m in MODES)}.")


def quantize(x: jax.Array, mode: str) -> tuple:
  """A flat float32 vector (length a multiple of BLOCK for int8) -> its payload."""
  if mode == "bfloat16":  # sent as its 16 bits: XLA:CPU would widen a bf16 collective
    return (lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16),)
  blocks = x.reshape(-1, BLOCK)
  scale = jnp.max(jnp.abs(blocks), axis=1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(blocks / scale[:, None]), -127, 127).astype(jnp.int8)
  return (q.reshape(x.shape), scale)


def dequantize(payload: tuple, mode: str) -> jax.Array:
  if mode == "bfloat16":
    return lax.bitcast_convert_type(payload[0], jnp.bfloat16).astype(jnp.float32)
  q, scale = payload
  blocks = q.reshape(q.shape[:-1] + (-1, BLOCK)).astype(jnp.float32)
  return (blocks * scale[..., None]).reshape(q.shape)


def _names(axis_name) -> tuple:
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def all_to_all(x: jax.Array, axis_name) -> jax.Array:
  """``x[k]`` goes to worker k; returns ``y`` with ``y[j]`` = what worker j sent here.
  One all-to-all per axis level (a tuple of mesh and vmap levels has no joint one)."""
  names = _names(axis_name)
  sizes = tuple(int(lax.psum(1, n)) for n in names)
  rest = x.shape[1:]
  x = x.reshape(sizes + rest)
  for d, n in enumerate(names):
    x = lax.all_to_all(x, n, d, d, tiled=True)
  return x.reshape((-1,) + rest)


def all_gather(x: jax.Array, axis_name) -> jax.Array:
  """Every worker's ``x`` stacked along a new leading axis, in worker order."""
  for n in reversed(_names(axis_name)):
    x = lax.all_gather(x, n)
  return x.reshape((-1,) + x.shape[len(_names(axis_name)):])


def compressed_mean(tree: Any, include: jax.Array, axis_name, mode: str,
                    error: Any = None) -> tuple[Any, Any, jax.Array]:
  """``sum_i include_i d_i / sum_i include_i`` of a per-worker tree ``d``, exchanged in
  ``mode``; the same result, bit for bit, on every worker.

  Args:
    tree: this worker's ``d_i`` (floating leaves; computed in float32).
    include: this worker's flag (bool scalar): a worker without it sends zeros and
      keeps its residual.
    axis_name: the worker axis.
    mode: ``"bfloat16"`` or ``"int8"``.
    error: this worker's residual ``e_i``, one float32 vector over the tree's leaves in
      order (:func:`residual_like`), or ``None`` for no error feedback. One vector, not
      a tree: sliced back into leaves, its update was recomputed once per leaf.

  Returns:
    ``(mean, new_error, count)``: the mean as a float32 tree (zeros when no worker is
    included), the new residual (``None`` without feedback; zeros where it went
    non-finite) and the number of included workers.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  err = error
  flat = _flat(tree) if err is None else _flat(tree) + err
  K = math.prod(int(lax.psum(1, n)) for n in _names(axis_name))
  n = flat.shape[0]
  unit = K * (BLOCK if mode == "int8" else 1)
  padded = -(-n // unit) * unit
  include = jnp.asarray(include, jnp.bool_)
  sent = jnp.where(include, jnp.pad(flat, (0, padded - n)), 0.0)
  payload = quantize(sent, mode)
  received = tuple(all_to_all(p.reshape((K, -1)), axis_name) for p in payload)
  count = lax.psum(include.astype(jnp.float32), axis_name)
  chunk = dequantize(received, mode).sum(0) / jnp.maximum(count, 1.0)
  gathered = tuple(all_gather(p, axis_name) for p in quantize(chunk, mode))
  mean = dequantize(gathered, mode).reshape(-1)[:n]
  new_error = None
  if err is not None:
    residual = jnp.where(include, flat - dequantize(payload, mode)[:n], err)
    new_error = jnp.where(jnp.isfinite(residual), residual, 0.0)
  return _unflatten(mean, leaves, treedef), new_error, count


def residual_like(tree: Any) -> jax.Array:
  """A zero residual for :func:`compressed_mean`'s error feedback over ``tree``."""
  return jnp.zeros(sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(tree)),
                   jnp.float32)


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(l).astype(jnp.float32)
                          for l in jax.tree_util.tree_leaves(tree)])


def _unflatten(flat, leaves, treedef):
  out, i = [], 0
  for l in leaves:
    out.append(flat[i:i + l.size].reshape(l.shape))
    i += l.size
  return jax.tree_util.tree_unflatten(treedef, out)
