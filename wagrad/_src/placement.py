"""Stacked per-worker trees: building them, placing them on the devices, each worker's data.

Arguments of a mapped step carry a leading worker dimension K on every leaf, except the
leaves under a shared node (:func:`wagrad.shared_state`, :class:`wagrad.Shared`), which
are the same for every worker and are not stacked (module doc of
:mod:`wagrad._src.parallel`). Here:

* :func:`stack_workers`, :func:`unstack_worker`: per-worker pytrees to one stacked tree
  and back;
* :class:`Placement`, the base of :class:`wagrad.Runner`: a transform's state for every
  worker (``runner.init``), copies of one worker's tree (``runner.replicate``), each
  worker's data (``runner.sample``, every worker drawing from the whole set;
  ``runner.shard``, disjoint shards; ``runner.worker_keys``), their placement on the
  backend's devices (``runner.put``: stacked leaves sharded by worker, shared leaves
  replicated) and the check that a step's arguments are stacked as the mapped
  function expects;
* :func:`check_shared_equal`: ``Runner(debug=True)``'s check, after a step, that every
  shared leaf is the same on every device.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wagrad._src import base


def stack_workers(trees: Sequence[Any]) -> base.PyTree:
  """Stack a list of per-worker pytrees (same structure) along a new leading axis."""
  if not trees:
    raise ValueError("`trees` must hold at least one worker's pytree.")
  s0 = jax.tree_util.tree_structure(trees[0], is_leaf=base.is_shared)
  for i, t in enumerate(trees[1:], 1):
    si = jax.tree_util.tree_structure(t, is_leaf=base.is_shared)
    if si != s0:  # type: ignore[operator]  # PyTreeDef compares, its stub says no
      raise TypeError(f"pytree mismatch between workers: worker {i} has {si}, worker 0 has {s0}.")
  leaves = [jax.tree_util.tree_leaves(t) for t in trees]
  for i, lv in enumerate(leaves[1:], 1):
    for a, b in zip(leaves[0], lv):
      if np.shape(a) != np.shape(b):
        raise TypeError(
            f"pytree mismatch between workers: worker {i} has a leaf of shape "
            f"{np.shape(b)} where worker 0 has {np.shape(a)}.")
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack_worker(tree: base.PyTree, index: int) -> base.PyTree:
  """Worker ``index``'s slice of a stacked tree (shared nodes are returned as they are)."""
  return jax.tree_util.tree_map(
      lambda n: n if base.is_shared(n) else jax.tree_util.tree_map(lambda x: x[index], n),
      tree, is_leaf=base.is_shared)


def check_shared_equal(out):
  """Raise if a shared leaf of ``out`` differs between the devices that hold it."""
  nodes = jax.tree_util.tree_flatten_with_path(out, is_leaf=base.is_shared)[0]
  for path, node in nodes:
    if not base.is_shared(node):
      continue
    for sub, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
      shards = getattr(leaf, "addressable_shards", None)
      if not shards or len(shards) < 2:
        continue
      vals = [np.asarray(sh.data) for sh in shards]
      bad = [i for i, v in enumerate(vals)
             if v.shape != vals[0].shape or not np.array_equal(v, vals[0], equal_nan=True)]
      if bad:
        name = jax.tree_util.keystr(tuple(path) + tuple(sub))
        raise RuntimeError(
            f"shared leaf {name} differs between devices after this step (device "
            f"{shards[0].device.id}: {vals[0].ravel()[:4]}, device {shards[bad[0]].device.id}: "
            f"{vals[bad[0]].ravel()[:4]}). Shared state must be the same on every worker "
            f"or the next exchange deadlocks: pass every wagrad.Shared input with the "
            f"same value on every device and process, and keep the wagrad transform "
            f"outermost.")


class Placement:
  """Base of :class:`wagrad.Runner`: builds, places and checks its stacked trees.

  It reads the layout that ``Runner.__init__`` sets (the attributes below): the
  backend, K, the axis levels (those of the mesh among them) and the mesh.
  """

  backend: str
  num_workers: int
  levels: tuple
  mesh: Mesh | None
  _mesh_levels: list
  _stacked: dict

  @property
  def _mesh_spec(self):
    names = tuple(l.name for l in self._mesh_levels)
    return P(names if len(names) > 1 else names[0])

  def replicate(self, tree):
    """Give every worker a copy of ``tree`` (shared nodes stay unstacked); placed."""
    K = self.num_workers
    self._refuse_restacking(tree)
    out = jax.tree_util.tree_map(
        lambda n: n if base.is_shared(n) else jax.tree_util.tree_map(
            lambda x: jnp.broadcast_to(jnp.asarray(x), (K,) + jnp.shape(x)), n),
        tree, is_leaf=base.is_shared)
    out = self.put(out)
    for x in jax.tree_util.tree_leaves(out):  # remembered weakly, to refuse restacking
      if isinstance(x, jax.Array):
        self._stacked[id(x)] = weakref.ref(x, lambda _, k=id(x): self._stacked.pop(k, None))
    return out

  def _refuse_restacking(self, tree):
    """``runner.replicate(runner.init(...))`` would stack the workers twice (K x K):
    refuse a leaf this runner stacked itself, naming it."""
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      ref = self._stacked.get(id(x))
      if ref is not None and ref() is x:
        raise ValueError(
            f"leaf {jax.tree_util.keystr(path)} is already stacked for the {self.num_workers} "
            f"workers (runner.init and runner.replicate return one copy per worker): pass "
            f"it to the mapped step as it is; replicate only one worker's tree.")

  def init(self, tx, params):
    """``tx.init(params)`` for one worker's params, replicated to every worker.

    ``tx.init`` runs with the runner's axis names bound (sizes as in the run, every
    worker given the same params), so a transform can size its per-worker vectors
    (weights, leader one-hots) from ``wagrad.axis_size`` at init. Every leaf of the
    result is a buffer of its own (a state that stored one array in two fields could
    not be donated).
    """
    f = tx.init
    for lvl in reversed(self.levels):
      f = jax.vmap(f, in_axes=None, out_axes=None, axis_name=lvl.name, axis_size=lvl.size)
    state = f(params)
    base.check_outermost(state)
    return self.replicate(base.tree_copy(state))

  def worker_keys(self, key):
    """One PRNG key per worker (stacked), from one key."""
    return self.put(jax.random.split(key, self.num_workers))

  def sample(self, *arrays, batch_size: int, step: int, seed: int = 0):
    """One step's batches, every worker drawing from the whole training set.

    Each worker k draws ``batch_size`` example indices uniformly (with replacement) from
    all n examples, from a NumPy stream of its own seeded by ``(seed, step, k)``:
    the papers' setting (LSGD, EASGD, WASGD: every worker samples the whole data set).
    The same call gives the same batches, on every backend. Returns ``(K, batch_size,
    ...)`` per array, placed for the backend.

    The other option, :meth:`shard`, gives each worker a disjoint part of the data
    (one-shot averaging's setting). Then the worker with the lowest training loss is
    the most over-fit one, and the rules that elect by training loss (LSGD's leader,
    WASGD's weights) favour it.

    Example:
      >>> import numpy as np, wagrad
      >>> runner = wagrad.Runner("vmap", num_workers=4)
      >>> X, y = np.arange(20.0).reshape(10, 2), np.arange(10)
      >>> xs, ys = runner.sample(X, y, batch_size=3, step=0)
      >>> xs.shape, ys.shape
      ((4, 3, 2), (4, 3))
    """
    base.check_positive_int("batch_size", batch_size)
    base.check_nonneg_int("step", step)
    base.check_nonneg_int("seed", seed)
    data = [np.asarray(a) for a in arrays]
    n = data[0].shape[0] if data else 0
    if n == 0 or any(a.shape[0] != n for a in data):
      raise ValueError(f"runner.sample: arrays must have the same number (>= 1) of "
                       f"examples, got {[a.shape[0] for a in data]}.")
    idx = np.stack([np.random.default_rng([seed, step, k]).integers(0, n, batch_size)
                    for k in range(self.num_workers)])
    out = [self.put(a[idx]) for a in data]
    return out[0] if len(out) == 1 else tuple(out)

  def shard(self, *arrays, drop_remainder=True):
    """Split data sets into K equal per-worker shards: (n, ...) -> (K, n // K, ...).

    Each worker then sees only its own part of the data; see :meth:`sample` for every
    worker sampling the whole set (what LSGD's and WASGD's elections assume)."""
    K = self.num_workers
    out = []
    for a in arrays:
      a = np.asarray(a)
      n = (a.shape[0] // K) * K if drop_remainder else a.shape[0]
      if n % K or n == 0:
        raise ValueError(f"cannot split {a.shape[0]} examples over {K} workers.")
      out.append(a[:n].reshape((K, n // K) + a.shape[1:]))
    return out[0] if len(out) == 1 else tuple(out)

  def _named_shardings(self):
    """(sharding of stacked leaves, sharding of shared leaves)."""
    if not hasattr(self, "_shardings"):
      self._shardings = (NamedSharding(self.mesh, self._mesh_spec), NamedSharding(self.mesh, P()))
    return self._shardings

  def put(self, tree):
    """Place a stacked tree as the backend expects (shard_map: sharded by worker).

    Leaves already placed as required are passed through untouched (cheap), so calling
    this on every step's state costs almost nothing.
    """
    if self.backend == "vmap":
      return tree
    stacked, repl = self._named_shardings()

    def place_leaf(x, sh):
      if isinstance(x, jax.Array) and x.sharding == sh:
        return x
      return jax.device_put(x, sh)

    def place(n):
      sh = repl if base.is_shared(n) else stacked
      return jax.tree_util.tree_map(lambda x: place_leaf(x, sh), n)

    return jax.tree_util.tree_map(place, tree, is_leaf=base.is_shared)

  def _check_stacked(self, args):
    K = self.num_workers
    for i, arg in enumerate(args):
      sh = base.find_shared(arg, "count")
      if sh is not None and jnp.ndim(sh.count) != 0:  # jax.vmap(tx.init) stacked it
        raise ValueError(
            f"argument [{i}] holds a wagrad state whose shared step count has shape "
            f"{jnp.shape(sh.count)}: shared state must not be stacked (every worker "
            f"takes the same exchange branch). {self._stacking_hint(arg)}")
      for path, leaf in jax.tree_util.tree_leaves_with_path(
          jax.tree_util.tree_map(lambda n: None if base.is_shared(n) else n, arg,
                                 is_leaf=base.is_shared)):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != K:
          raise ValueError(
              f"argument leaf [{i}]{jax.tree_util.keystr(path)} has shape "
              f"{jnp.shape(leaf)}: per-worker leaves need a leading dimension of {K} "
              f"workers. {self._stacking_hint(arg)}")

  def _stacking_hint(self, arg):
    """How to give an argument its worker dimension, by what it looks like."""
    K = self.num_workers
    if base.find_shared(arg, "count") is not None:  # a wagrad transform's state
      return ("This is an optimizer state: build it with opt_state = runner.init(tx, "
              "params0) from one worker's params (not tx.init(params0), not "
              "jax.vmap(tx.init)); it stacks the per-worker parts and keeps the shared "
              "ones unstacked.")
    return (f"Parameters: params = runner.replicate(params0); data: each worker's batch "
            f"from runner.sample(key, step, X, y, batch_size) or disjoint shards from "
            f"runner.shard(X, y) -> ({K}, n // {K}, ...); values shared by all workers: "
            f"wrap them in wagrad.Shared.")
