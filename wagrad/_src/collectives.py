"""Collectives over a named worker axis, built only from ``jax.lax`` collectives.

Every function here is called *inside* a function mapped over the workers (by
:class:`wagrad.Runner`, ``jax.vmap(..., axis_name=)``, ``jax.pmap`` or
``jax.shard_map``) and takes the axis name: a string, or a tuple of names ordered
outer to inner (e.g. ``("devices", "per_device")`` when K workers > D devices, or
``("groups", "local")`` for all workers of a two-level layout).

Numerics: reductions accumulate in float32 (or wider) whatever the parameters'
dtype, and results are cast back. A worker whose loss or parameters are non-finite
gets weight 0 and is never elected leader; when *every* worker is non-finite the
functions return the caller's own value and an ``ok=False`` flag instead of NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from wagrad._src import base

AxisName = base.AxisName
PyTree = base.PyTree


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def axis_size(axis_name: AxisName):
  """Number of workers along ``axis_name`` (a Python int at trace time)."""
  base.check_axis_name(axis_name)
  return lax.psum(1, axis_name)


def worker_index(axis_name: AxisName):
  """This worker's index along ``axis_name`` (row-major over a tuple of axes)."""
  base.check_axis_name(axis_name)
  return lax.axis_index(axis_name)


def all_gather(tree, axis_name: AxisName):
  """Stack every worker's ``tree`` along a new leading axis (ordered by worker index).

  Works over a tuple of axes that contains vmap axes (``lax.all_gather`` alone does
  not): gathers the innermost axis first, then the outer ones, then flattens.
  """
  base.check_axis_name(axis_name)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def gather(x):
    for n in reversed(names):
      x = lax.all_gather(x, n)
    lead = x.shape[: len(names)]
    return x.reshape((-1,) + x.shape[len(names):]) if len(lead) > 1 else x

  return jax.tree_util.tree_map(gather, tree)


def send(tree, op, dtype=None, *, flat=None, bucket_bytes=None):
  """Apply a collective ``op`` (array or list of arrays -> the same shapes) to a pytree:
  every exchange of every wagrad transform sends its message through here.

  Leaves are cast to their accumulation dtype (float32 for bf16 / f16 / f32 leaves;
  ``dtype`` forces one) and cast back after. How the message travels:

  * ``flat=True``: raveled and joined into one flat buffer per accumulation dtype, as
    PyTorch's model averager does (``bucket_bytes``: split at leaf boundaries into
    buckets of about that many bytes, as DDP's). Across processes over gloo an
    all-reduce of the 1.06M-parameter MLP's 6 leaves took 116 ms where one flat buffer
    took 26 ms: gloo runs each buffer of a multi-buffer all-reduce on its own.
  * ``flat=False``: the leaves as they are, as ``lax.psum(tree)`` sends them. Within
    one process (forced CPU devices, one host's GPUs) the join and the slices back cost
    parameter-sized copies (1M parameters, 8 forced CPU devices: a flat ``pmean`` took
    14.4 ms, the leaves 5.1 ms; ``benchmarks/message.py``) and XLA combines all-reduces on GPUs and TPUs itself.
  * ``flat=None`` (default): flat exactly when the run spans processes
    (``jax.process_count() > 1``). Only the message is flat: the state stays a tree.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if not leaves:
    return tree
  if flat is None:
    flat = jax.process_count() > 1
  leaves = [jnp.asarray(x) for x in leaves]
  accs = [jnp.dtype(dtype or (_acc_dtype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact)
                              else x.dtype)) for x in leaves]
  if not flat:
    out = op([x.astype(a) for x, a in zip(leaves, accs)])
    return jax.tree_util.tree_unflatten(
        treedef, [o.astype(x.dtype) for o, x in zip(out, leaves)])
  groups = {}
  for i, acc in enumerate(accs):
    groups.setdefault(acc, []).append(i)
  out = [None] * len(leaves)
  for acc, idx in groups.items():
    for bucket in _buckets(idx, leaves, acc, bucket_bytes):
      parts = [leaves[i].astype(acc).ravel() for i in bucket]
      res = op(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
      off = 0
      for i in bucket:
        n = leaves[i].size
        out[i] = res[off:off + n].reshape(leaves[i].shape).astype(leaves[i].dtype)
        off += n
  return jax.tree_util.tree_unflatten(treedef, out)


def _buckets(idx, leaves, acc, bucket_bytes):
  """Leaf indices ``idx`` split, in order, into runs of about ``bucket_bytes``."""
  if bucket_bytes is None:
    return [idx]
  out, cur, size = [], [], 0
  for i in idx:
    cur.append(i)
    size += leaves[i].size * acc.itemsize
    if size >= bucket_bytes:
      out, cur, size = out + [cur], [], 0
  return out + ([cur] if cur else [])


def tree_is_finite(tree):
  """Scalar bool: every element of every leaf is finite."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def pmean_tree(tree, axis_name: AxisName):
  """Plain mean of a pytree over workers (float32 accumulation). Same on every worker."""
  base.check_axis_name(axis_name)
  return send(tree, lambda v: lax.pmean(v, axis_name))


class Weighted(NamedTuple):
  """Result of :func:`weighted_mean`: the mean, this worker's normalised weight, status."""
  value: object
  weight: jax.Array
  ok: jax.Array


def weighted_mean(tree: PyTree, weight: ArrayLike, axis_name: AxisName, *,
                  exclude_nonfinite: bool = True, fallback: PyTree | None = None) -> Weighted:
  """Weighted mean ``sum_j w_j x_j / sum_j w_j`` of a pytree over workers.

  Args:
    tree: this worker's pytree x_i.
    weight: this worker's non-negative scalar weight w_i (need not be normalised).
    axis_name: the worker axis.
    exclude_nonfinite: give weight 0 to a worker whose tree or weight is non-finite.
      Costs a finiteness test of the sum on every call and, in the compiled program,
      the temporaries of the second sum it falls back to (run only when the test
      fails). It is what separates :func:`wagrad.model_averaging` from the same math
      written by hand in optax's update shape (``benchmarks/api_floor.py``).
    fallback: the value returned when the total weight is 0 (default: this worker's
      own ``tree``). Pass a shared tree (e.g. the last center) to keep the result
      shared -- identical on all workers, unbatched under vmap.

  Returns:
    ``Weighted(value, weight, ok)``: the mean (identical on every worker), this
    worker's normalised weight, and ``ok`` -- False when the total weight is 0 (e.g.
    every worker is non-finite); then ``value`` is ``fallback``.
  """
  base.check_axis_name(axis_name)
  w = jnp.asarray(weight, jnp.float32)
  w = jnp.where(jnp.isfinite(w) & (w > 0), w, 0.0)
  if fallback is None:
    fallback = tree
  unit = isinstance(weight, (int, float)) and weight == 1  # plain mean: no products

  def reduce(finite):
    wf = jnp.where(finite, w, 0.0)
    contrib = jax.tree_util.tree_map(
        lambda x: jnp.where(finite, x, jnp.zeros_like(x)).astype(_acc_dtype(x.dtype)) * (
            1 if unit else wf.astype(_acc_dtype(x.dtype))), tree)
    summed, total = send((contrib, wf), lambda v: lax.psum(v, axis_name))
    return summed, total, wf

  def finish(summed, total, wf):
    ok = total > 0
    safe = jnp.where(ok, total, 1.0)
    value = jax.tree_util.tree_map(
        lambda m, x, fb: jnp.where(ok, m / safe.astype(m.dtype), fb.astype(m.dtype)
                                   ).astype(x.dtype), summed, tree, fallback)
    return Weighted(value, jnp.where(ok, wf / safe, 0.0), ok)

  first = reduce(jnp.bool_(True))
  if not exclude_nonfinite:
    return finish(*first)
  # Sum everyone first; only if the sum is not finite (a worker is non-finite, or the
  # sum overflows) sum again without the non-finite workers. The predicate comes from a
  # collective's result, the same on every worker (design.md, One clock); the
  # division is inside the branch so that its result is written there, not copied out.
  clean = jnp.isfinite(first[1]) & tree_is_finite(first[0])
  return lax.cond(clean, lambda: finish(*first),
                  lambda: finish(*reduce(tree_is_finite(tree) & jnp.isfinite(w))))


def normalize_weights(score, axis_name: AxisName):
  """This worker's ``s_i / sum_j s_j`` over workers; non-finite or negative s_i -> 0.

  Returns ``(weight, ok)``; ``ok`` is False (and every weight 0) when no score is
  positive and finite.
  """
  base.check_axis_name(axis_name)
  s = jnp.asarray(score, jnp.float32)
  s = jnp.where(jnp.isfinite(s) & (s > 0), s, 0.0)
  total = lax.psum(s, axis_name)
  ok = total > 0
  return jnp.where(ok, s / jnp.where(ok, total, 1.0), 0.0), ok


def softmax_weights(loss, axis_name: AxisName, temperature=1.0):
  """Boltzmann weights ``w_i = exp(-L_i / T) / sum_j exp(-L_j / T)`` over workers.

  ``temperature=inf`` gives uniform weights over the finite workers, ``temperature=0``
  puts all weight on the best worker (ties share). A worker with a non-finite loss
  gets weight 0. Returns ``(weight, ok)``; ``ok`` is False when no loss is finite.
  """
  base.check_axis_name(axis_name)
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"`temperature` must be >= 0, got {temperature!r}.")
  loss = jnp.asarray(loss, jnp.float32)
  finite = jnp.isfinite(loss)
  lmin = lax.pmin(jnp.where(finite, loss, jnp.inf), axis_name)
  t = jnp.asarray(temperature, jnp.float32)
  z = jnp.where(t > 0, (loss - lmin) / jnp.where(t > 0, t, 1.0),
                jnp.where(loss == lmin, 0.0, jnp.inf))
  z = jnp.where(jnp.isinf(t), 0.0, z)
  s = jnp.where(finite, jnp.exp(-z), 0.0)
  return normalize_weights(s, axis_name)


class Leader(NamedTuple):
  """Result of :func:`elect_leader`."""
  # worker index of the leader (int32); -1 when no loss is finite
  index: jax.Array  # type: ignore[assignment]  # shadows tuple.index
  loss: jax.Array    # the leader's loss
  ok: jax.Array      # False when every loss is non-finite


def elect_leader(loss: ArrayLike, axis_name: AxisName, eligible: ArrayLike = True) -> Leader:
  """Arg-min of the workers' losses; ties go to the lowest index.

  Workers with a non-finite loss (or ``eligible=False``) are never elected. One
  all-gather of the K losses (a ``pmin`` of the loss then one of the index would be
  two collectives, one after the other).
  """
  return elect_leader_and_mean(loss, None, axis_name, eligible)[0]


def elect_leader_and_mean(loss, value, axis_name: AxisName, eligible=True):
  """:func:`elect_leader`, and the mean over workers of a scalar ``value`` where it is
  finite (NaN if it is nowhere; ``value=None``: no mean), from the same all-gather.

  Returns ``(Leader, mean)``; both are the same on every worker.
  """
  base.check_axis_name(axis_name)
  loss = jnp.asarray(loss, jnp.float32)
  cand = jnp.isfinite(loss) & jnp.asarray(eligible)
  row = [jnp.where(cand, loss, jnp.inf)]
  if value is not None:
    value = jnp.asarray(value, jnp.float32)
    counted = jnp.isfinite(value)
    row += [jnp.where(counted, value, 0.0), counted.astype(jnp.float32)]
  table = all_gather(jnp.stack(row), axis_name)  # (K, 1 or 3)
  leader = jnp.argmin(table[:, 0]).astype(jnp.int32)  # the first of equal minima
  lmin = table[leader, 0]
  ok = jnp.isfinite(lmin)
  mean = None
  if value is not None:
    n = jnp.sum(table[:, 2])
    mean = jnp.where(n > 0, jnp.sum(table[:, 1]) / jnp.maximum(n, 1.0), jnp.nan)
  return Leader(jnp.where(ok, leader, -1).astype(jnp.int32), lmin, ok), mean


def broadcast_from(tree: PyTree, index: ArrayLike, axis_name: AxisName) -> PyTree:
  """Every worker receives worker ``index``'s pytree (exactly, bit for bit).

  lax has no one-to-all broadcast: this is a parameter-sized all-reduce of a one-hot
  masked tree (the other workers contribute exact zeros). ``index`` must be the same
  on every worker; an index out of range (e.g. the -1 of a failed election) gives
  zeros, so check ``Leader.ok`` first. The result is shared (unbatched under vmap).
  """
  base.check_axis_name(axis_name)
  me = lax.axis_index(axis_name) == index

  # Select (not multiply): a non-finite leaf of another worker must not leak in.
  masked = jax.tree_util.tree_map(lambda x: jnp.where(me, x, jnp.zeros_like(x)), tree)
  return send(masked, lambda v: lax.psum(v, axis_name))


def elastic_step(x: PyTree, center: PyTree, alpha: ArrayLike, axis_name: AxisName
                 ) -> tuple[PyTree, PyTree]:
  """One synchronous elastic-averaging exchange (EASGD eq. 5-6, simultaneous).

  ``x_i <- x_i - alpha (x_i - c)`` and ``c <- c + alpha * sum_i (x_i - c)``, both
  computed from the pre-exchange x_i and c. Returns ``(new_x, new_center)``; the new
  center is identical on every worker.
  """
  base.check_axis_name(axis_name)
  diff = jax.tree_util.tree_map(
      lambda a, c: a.astype(_acc_dtype(a.dtype)) - c.astype(_acc_dtype(a.dtype)), x, center)
  new_x = jax.tree_util.tree_map(
      lambda a, d: (a.astype(d.dtype) - alpha * d).astype(a.dtype), x, diff)
  tot = send(diff, lambda v: lax.psum(v, axis_name))
  new_c = jax.tree_util.tree_map(
      lambda c, s: (c.astype(s.dtype) + alpha * s).astype(c.dtype), center, tot)
  return new_x, new_c


def consensus_distance(tree: PyTree, axis_name: AxisName, mean: PyTree | None = None
                       ) -> jax.Array:
  """Mean over workers of ``||x_i - mean_j x_j||^2`` (a scalar, same on all workers).

  Pass ``mean`` when the workers' mean is already known (e.g. inside an averaging
  exchange): then only a scalar is all-reduced instead of a parameter-sized tree.
  """
  base.check_axis_name(axis_name)
  m = mean if mean is not None else pmean_tree(
      jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree), axis_name)
  sq = sum(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)
           for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(m)))
  return lax.pmean(jnp.asarray(sq, jnp.float32), axis_name)


def all_equal(x, axis_name: AxisName):
  """Debug check: True iff the scalar ``x`` is the same on every worker."""
  return lax.pmin(x, axis_name) == lax.pmax(x, axis_name)
