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

The runner's stacked trees and data (``runner.init``, ``replicate``, ``put``,
``sample``, ``shard``) come from its base class, :class:`wagrad._src.placement.Placement`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from wagrad._src import base
from wagrad._src.placement import Placement, check_shared_equal

BACKENDS = ("vmap", "shard_map", "pmap")


@dataclasses.dataclass(frozen=True)
class _Level:
  name: str
  size: int
  kind: str  # "mesh" or "vmap"


def _names(levels):
  names = tuple(l.name for l in levels)
  return names[0] if len(names) == 1 else names


_ONE_DEVICE = (
    "wagrad.Runner({backend!r}, {K}): JAX sees one device, so the {K} workers run "
    "vmapped on it. For {K} CPU devices set XLA_FLAGS="
    "--xla_force_host_platform_device_count={K} before JAX starts; to mean one device, "
    "pass num_devices=1 or use backend='vmap' (either silences this warning).")


class Runner(Placement):
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
        check_shared_equal(out)
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
