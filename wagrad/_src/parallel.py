"""Parallel runners: one per-worker function, run over K workers on any backend.

A per-worker function is written once against the runner's axis names, e.g.::

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, value=loss)
      return wagrad.apply_updates(params, updates, opt_state), opt_state, loss

and :meth:`Runner.map` runs it over the workers:

* ``"vmap"``: K simulated workers on one device (nested ``jax.vmap``);
* ``"shard_map"``: a ``Mesh`` over D devices, K/D workers per device (vmapped inside
  each device when K > D); the same code runs across hosts after
  ``jax.distributed.initialize`` (the mesh then spans every process's devices);
* ``"pmap"``: ``jax.pmap`` over D devices (with an inner vmap when K > D).

Arguments and results are pytrees whose leaves carry a leading worker dimension K,
except the leaves under a shared node (:func:`wagrad.shared_state`, :class:`wagrad.Shared`),
which are the same for every worker and are not stacked.

Two-level layouts (``groups=G``): worker k belongs to group ``k // (K // G)``;
``runner.group_axis`` names the axis of workers inside a group, ``runner.global_axis``
the axis across groups, ``runner.axis_name`` all workers.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wagrad._src import base

BACKENDS = ("vmap", "shard_map", "pmap")


@dataclasses.dataclass(frozen=True)
class _Level:
  name: str
  size: int
  kind: str  # "mesh" or "vmap"


def _names(levels):
  names = tuple(l.name for l in levels)
  return names[0] if len(names) == 1 else names


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


def _check_shared_equal(out):
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


_ONE_DEVICE = (
    "wagrad.Runner({backend!r}, {K}): JAX sees one device, so the {K} workers run "
    "vmapped on it. For {K} CPU devices set XLA_FLAGS="
    "--xla_force_host_platform_device_count={K} before JAX starts; to mean one device, "
    "pass num_devices=1 or use backend='vmap' (either silences this warning).")


class Runner:
  """Runs a per-worker function over ``num_workers`` workers on a chosen backend.

  Args:
    backend: ``"vmap"``, ``"shard_map"`` or ``"pmap"``.
    num_workers: K, the number of workers.
    groups: optional number of groups G for two-level algorithms (G must divide K).
    devices: devices to use (default: all of ``jax.devices()``, at most K of them).
    num_devices: use the first ``num_devices`` devices (D must divide K).
    wait: block on every step's result. Default: on CPU for shard_map/pmap (forced CPU
      devices deadlock when more than ~2 collective programs are in flight), never on
      GPU/TPU.
    debug: after every step of :meth:`map`, check that each shared leaf of the result
      (step count, center, leader copy...) is the same on every device, and raise
      naming the first leaf that differs (e.g. a shared input that differs between
      the processes of a multi-host run: the next exchange would deadlock). A shared
      output computed from per-worker values (a transform inside
      ``optax.apply_if_finite``) is refused when the step is traced, debug or not.
      Costs a device-to-host copy of the shared state per step.
  """

  def __init__(self, backend: str = "vmap", num_workers: int = 8, *, groups: int | None = None,
               devices=None, num_devices: int | None = None, wait: bool | None = None,
               debug: bool = False):
    if backend not in BACKENDS:
      raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}.")
    base.check_positive_int("num_workers", num_workers)
    base.check_positive_int("groups", groups, allow_none=True)
    if groups is not None and num_workers % groups:
      raise ValueError(f"`groups`={groups} must divide `num_workers`={num_workers}.")
    self.backend = backend
    self.num_workers = int(num_workers)
    self.groups = groups
    K, G = self.num_workers, groups
    if backend == "vmap":
      self.devices = None
      D = 1
    else:
      devs = list(devices) if devices is not None else list(jax.devices())
      if num_devices is not None:
        base.check_positive_int("num_devices", num_devices)
        if num_devices > len(devs):
          raise ValueError(f"`num_devices`={num_devices} but only {len(devs)} devices exist.")
        devs = devs[:num_devices]
      elif len(devs) > K:
        devs = devs[:K] if K >= 1 else devs
      D = len(devs)
      if D == 1 < K and devices is None and num_devices is None:
        warnings.warn(_ONE_DEVICE.format(backend=backend, K=K), UserWarning, stacklevel=2)
      if K % D:
        raise ValueError(
            f"`num_workers`={K} is not divisible by the number of devices {D}: "
            f"use a multiple of {D} workers or pass num_devices.")
      self.devices = devs
    self.num_devices = D

    if G is None:
      if backend == "vmap":
        levels = [_Level("workers", K, "vmap")]
      elif K == D:
        levels = [_Level("workers", D, "mesh")]
      else:  # no axis is called "workers" here: a transform left at the default axis
        # would reduce over the devices only (groups of K/D workers that never meet);
        # unbound, it raises and names runner.axis_name (design.md, More workers than
        # devices)
        levels = [_Level("workers_devices", D, "mesh"), _Level("workers_local", K // D, "vmap")]
      group_names: list[str] = []
      global_names: list[str] = []
    else:
      W = K // G
      if backend == "vmap":
        levels = [_Level("groups", G, "vmap"), _Level("local", W, "vmap")]
        global_names, group_names = ["groups"], ["local"]
      elif G % D == 0:
        levels = [_Level("groups", D, "mesh")]
        global_names = ["groups"]
        if G // D > 1:
          levels.append(_Level("groups_local", G // D, "vmap"))
          global_names.append("groups_local")
        levels.append(_Level("local", W, "vmap"))
        group_names = ["local"]
      elif D % G == 0:
        if backend == "pmap":
          raise ValueError(
              f"pmap runs one mesh axis: with groups={G} < devices={D} use backend='shard_map'.")
        levels = [_Level("groups", G, "mesh"), _Level("local", D // G, "mesh")]
        global_names, group_names = ["groups"], ["local"]
        if K // D > 1:
          levels.append(_Level("local_vmap", K // D, "vmap"))
          group_names.append("local_vmap")
      else:
        raise ValueError(f"`groups`={G} and the number of devices {D} must divide one another.")
    self.levels = tuple(levels)
    self.axis_name = _names(levels)
    self.group_axis = None if G is None else (
        group_names[0] if len(group_names) == 1 else tuple(group_names))
    self.global_axis = None if G is None else (
        global_names[0] if len(global_names) == 1 else tuple(global_names))
    mesh_levels = [l for l in levels if l.kind == "mesh"]
    self._mesh_levels = mesh_levels
    self._vmap_levels = [l for l in levels if l.kind == "vmap"]
    self.mesh: Mesh | None = None
    if backend in ("shard_map", "pmap"):  # pmap: the mesh only places inputs as outputs come
      self.mesh = Mesh(np.asarray(self.devices).reshape([l.size for l in mesh_levels]),
                       tuple(l.name for l in mesh_levels))
    if wait is None:
      platform = (self.devices or jax.devices())[0].platform
      wait = backend != "vmap" and platform == "cpu"
    self.wait = bool(wait)
    self.debug = bool(debug)
    self._stacked: dict = {}  # id -> weak reference of the arrays replicate() stacked

  def __repr__(self):
    return (f"Runner(backend={self.backend!r}, num_workers={self.num_workers}, "
            f"groups={self.groups}, num_devices={self.num_devices}, axis_name={self.axis_name!r})")

  # ------------------------------------------------------------------ state helpers

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

  # ------------------------------------------------------------------ mapping

  def _nest_vmap(self, fn, levels, in_axes, out_axes):
    f = fn
    for lvl in reversed(levels):
      f = jax.vmap(f, in_axes=in_axes, out_axes=out_axes, axis_name=lvl.name)
    return f

  @staticmethod
  def _reshape_stacked(tree, shape_prefix):
    return jax.tree_util.tree_map(
        lambda nd: nd if base.is_shared(nd) else jax.tree_util.tree_map(
            lambda x: x.reshape(tuple(shape_prefix) + x.shape[1:]), nd),
        tree, is_leaf=base.is_shared)

  @staticmethod
  def _flatten_stacked(tree, n_lead):
    return jax.tree_util.tree_map(
        lambda nd: nd if base.is_shared(nd) else jax.tree_util.tree_map(
            lambda x: x.reshape((-1,) + x.shape[n_lead:]), nd),
        tree, is_leaf=base.is_shared)

  def _out_axes(self, fn, args, in_axes):
    """Find which outputs are shared by evaluating shapes through all-vmap levels."""
    levels = [_Level(l.name, l.size, "vmap") for l in self.levels]
    shaped = self._reshape_stacked(args, [l.size for l in levels])
    out = jax.eval_shape(self._nest_vmap(fn, levels, tuple(in_axes), 0), *shaped)
    self._check_shared_outputs(fn, levels, shaped, tuple(in_axes), out)
    return out

  def _check_shared_outputs(self, fn, levels, shaped, in_axes, out):
    """At trace time, on every backend: a shared output (unstacked) must be the same on
    every worker, i.e. unbatched when every level is a vmap. Raises naming the first
    shared leaf computed from per-worker values."""
    def varies(out_axes):
      try:
        jax.eval_shape(self._nest_vmap(fn, levels, in_axes, out_axes), *shaped)
        return False
      except ValueError as e:
        if "out_axes is None" not in str(e):
          raise
        return True

    if not varies(base.worker_axes(out)):
      return
    full = jax.tree_util.tree_map(  # -1 at shared leaves, 0 at stacked ones
        lambda n: jax.tree_util.tree_map(lambda _: -1 if base.is_shared(n) else 0, n),
        out, is_leaf=base.is_shared)
    flat, treedef = jax.tree_util.tree_flatten_with_path(full)
    for i, (path, v) in enumerate(flat):
      axes = [None if j == i else 0 for j in range(len(flat))]
      if v == -1 and varies(jax.tree_util.tree_unflatten(treedef, axes)):
        raise ValueError(
            f"shared output {jax.tree_util.keystr(path)} of the step differs between "
            f"workers (it is computed from per-worker values), so it cannot stay "
            f"unstacked. A per-worker skip around a wagrad transform "
            f"(optax.apply_if_finite, optax.MultiSteps) does this to its clock: put the "
            f"wrapper inside, as the inner optimizer, e.g. wagrad.model_averaging("
            f"optax.apply_if_finite(optax.sgd(0.1), 5), ...). A value you return wrapped "
            f"in wagrad.Shared must be the same on every worker.")

  def map(self, fn: Callable, *, jit: bool = True, donate_argnums=()) -> Callable:
    """Return ``g(*args)`` running ``fn`` on every worker (args stacked, see module doc).

    ``g.lower(*args)`` lowers the program ``g`` runs, donation and input placement
    included (for HLO inspection), and ``g.num_traces()`` says how many times it was
    traced (1 for a run that compiled once).
    ``donate_argnums`` donates those arguments' buffers to the step (as ``jax.jit``):
    saves a copy of the state per step; the donated inputs must not be used again.
    """
    runner = self
    traces = [0]

    def mapped(*args):
      traces[0] += 1  # Python side effect: runs once per trace (compilation), not per step
      runner._check_stacked(args)  # at trace time: shapes are static
      in_axes = tuple(base.worker_axes(a) for a in args)
      out_struct = runner._out_axes(fn, args, in_axes)
      out_axes = base.worker_axes(out_struct)
      vsizes = [l.size for l in runner._vmap_levels]
      if runner.backend == "vmap":
        sh = runner._reshape_stacked(args, vsizes)
        out = runner._nest_vmap(fn, runner._vmap_levels, in_axes, out_axes)(*sh)
        return runner._flatten_stacked(out, len(vsizes))
      inner = runner._inner(fn, in_axes, out_axes)
      if runner.backend == "shard_map":
        spec = runner._mesh_spec
        in_specs = tuple(base.worker_axes(a, stacked=spec, shared=P()) for a in args)
        out_specs = base.worker_axes(out_struct, stacked=spec, shared=P())
        return jax.shard_map(inner, mesh=runner.mesh, in_specs=in_specs,
                             out_specs=out_specs, check_vma=False)(*args)
      # pmap: [K, ...] -> [D, K/D, ...]
      D = runner.num_devices
      sh = runner._reshape_stacked(args, [D, runner.num_workers // D])
      pm = jax.pmap(lambda *a: inner(*a), axis_name=runner._mesh_levels[0].name,
                    in_axes=in_axes, out_axes=out_axes, devices=runner.devices)
      return runner._flatten_stacked(pm(*sh), 2)

    plain = jax.jit(mapped, donate_argnums=donate_argnums) if jit else mapped
    by_structure: dict = {}

    def placed_jit(args):
      """shard_map: a jit per argument structure whose in_shardings place the inputs,
      so a step's own outputs go straight back in on JAX's C++ dispatch path (no Python
      walk over the leaves); anything else is placed by :meth:`put` first."""
      key = jax.tree_util.tree_structure(args)
      f = by_structure.get(key)
      if f is None:
        stacked, repl = runner._named_shardings()
        in_sh = tuple(base.worker_axes(a, stacked=stacked, shared=repl) for a in args)
        f = by_structure[key] = jax.jit(mapped, in_shardings=in_sh,
                                        donate_argnums=donate_argnums)
      return f

    @functools.wraps(fn)
    def call(*args):
      if self.backend == "shard_map" and jit:
        f = placed_jit(args)
        try:
          out = f(*args)
        except ValueError as e:  # an input not placed as the step expects
          if "sharding" not in str(e).lower():
            raise
          self._check_stacked(args)
          out = f(*self.put(args))
      else:
        if self.backend != "vmap":
          self._check_stacked(args)
          args = self.put(args)
        out = plain(*args)
      if self.wait:
        out = jax.block_until_ready(out)
      if self.debug:
        _check_shared_equal(out)
      return out

    def lower(*args):
      """Lower the program ``call`` runs (its donation and input placement included)."""
      args = self.put(args)
      if self.backend == "shard_map" and jit:
        return placed_jit(args).lower(*args)
      return (plain if jit else jax.jit(mapped)).lower(*args)

    call.lower = lower  # type: ignore[attr-defined]
    call.num_traces = lambda: traces[0]  # type: ignore[attr-defined]
    return call

  def _inner(self, fn, in_axes, out_axes):
    """Per-device body: local block [K/D, ...] -> vmap levels -> fn."""
    vlevels = self._vmap_levels
    vsizes = [l.size for l in vlevels]

    def body(*blocks):
      if not vlevels:
        sq = tuple(jax.tree_util.tree_map(
            lambda nd: nd if base.is_shared(nd) else jax.tree_util.tree_map(lambda x: x[0], nd),
            b, is_leaf=base.is_shared) for b in blocks)
        out = fn(*sq)
        return jax.tree_util.tree_map(
            lambda ax, o: o if ax is None else jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], o),
            out_axes, out, is_leaf=lambda x: x is None)
      sh = self._reshape_stacked(blocks, vsizes)
      out = self._nest_vmap(fn, vlevels, in_axes, out_axes)(*sh)
      return self._flatten_stacked(out, len(vsizes))

    return body
