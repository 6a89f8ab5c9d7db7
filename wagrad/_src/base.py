"""Shared building blocks of every wagrad transform.

Two kinds of state (architecture, decision 2):

* **worker state** -- parameter-shaped leaves and the inner optimizer's state. It is
  stacked along the worker axis outside the mapped step.
* **shared state** -- step count, center variable, leader copy, outer optimizer
  state... identical on every worker, computed only from collectives, and *not*
  stacked. A shared part of a state is a dataclass decorated with
  :func:`shared_state`; the parallel runners map every leaf below such a node with
  ``in_axes=None`` / ``P()``.

Every wagrad transform's shared state has the fields ``count`` (the global step, which
alone decides when workers communicate), ``target`` (a params-shaped tree or ``None``)
and ``assign`` (bool). On a step where the rule *assigns* parameters (averaging,
moving to the leader with strength 1, the end of the warm-up) ``assign`` is true and
:func:`apply_updates` returns ``target`` bit-exactly instead of ``params + updates``
(decision 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
AxisName = Union[str, tuple]
Period = Union[int, Callable[[Any], Any]]

_SHARED_FLAG = "__wagrad_shared__"


def shared_state(cls=None, *, packed=False):
  """Class decorator: a frozen dataclass pytree whose leaves are shared by all workers.

  With ``packed=True`` the whole node travels as :class:`Flat` -- one buffer per dtype
  (an int32 one for counters and indices, a float32 one for a center or leader copy and
  the float metrics, ...) -- whenever it is flattened (at a jit boundary, in a
  checkpoint), while its fields still read as arrays and trees. On forced CPU devices
  every leaf a step carries costs a buffer per device and call
  (benchmarks/overhead_ablation.py), so this keeps a transform's shared state at a leaf
  or three; inside a jitted step the packing and slicing are fused into the program.
  """
  if cls is None:
    return lambda c: shared_state(c, packed=packed)
  cls = dataclasses.dataclass(frozen=True)(cls)
  setattr(cls, _SHARED_FLAG, True)
  fields = tuple(f.name for f in dataclasses.fields(cls))
  if not packed:
    return jax.tree_util.register_dataclass(cls, data_fields=list(fields), meta_fields=[])
  names = frozenset(fields)

  def pack(obj):
    d = obj.__dict__
    done = d.get("_children")
    if done is not None:  # a packed state is flattened several times per step
      return done
    p = d.get("_packed")
    # Cache only what was unflattened from buffers (the same buffers come back). A state
    # built from fields makes new arrays when packed -- tracers inside a trace -- so it
    # is never cached.
    cache = p is not None
    if not cache:
      p = flatten(tuple(d[n] for n in fields))
    keys = tuple(p.buffers)
    done = ([p.buffers[k] for k in keys], (keys, p.spec))
    if cache:
      object.__setattr__(obj, "_children", done)
    return done

  def flatten_with_keys(obj):
    children, aux = pack(obj)
    return [(jax.tree_util.DictKey(k), c) for k, c in zip(aux[0], children)], aux

  def unflatten_fn(aux, children):
    obj = object.__new__(cls)
    keys, spec = aux
    object.__setattr__(obj, "_packed", Flat(dict(zip(keys, children)), spec))
    return obj

  jax.tree_util.register_pytree_with_keys(
      cls, flatten_with_keys, unflatten_fn, flatten_func=pack)

  index = {n: i for i, n in enumerate(fields)}
  cls._wagrad_packed = True

  def __getattribute__(self, name):
    if name in names:
      d = object.__getattribute__(self, "__dict__")
      if name in d:
        return d[name]
      # slices of the packed buffers, taken on every read (not cached: a read inside
      # a cond branch must not leave that branch's tracers behind)
      p = d["_packed"]
      treedef, infos = p.spec
      kids = treedef.children()
      i = index[name]
      start = sum(k.num_leaves for k in kids[:i])
      leaves = _unpack_leaves(p, infos, range(start, start + kids[i].num_leaves))
      return jax.tree_util.tree_unflatten(kids[i], leaves)
    return object.__getattribute__(self, name)

  cls.__getattribute__ = __getattribute__
  return cls


def replace(obj, **changes):
  """``dataclasses.replace`` for shared states. On a packed state the buffers that hold
  none of the changed fields are carried over as they are (not rebuilt from slices of
  themselves), so a branch that only moves the clock passes the parameter-sized float
  buffer through untouched."""
  new = dataclasses.replace(obj, **changes)
  if not getattr(type(obj), "_wagrad_packed", False):
    return new
  old = object.__getattribute__(obj, "__dict__").get("_packed")
  if old is None:
    return new
  flat = flatten(tuple(getattr(new, f.name) for f in dataclasses.fields(new)))
  if flat.spec != old.spec:
    return new
  treedef, infos = old.spec
  touched, start = set(), 0
  for f, kid in zip(dataclasses.fields(new), treedef.children()):
    if f.name in changes:
      touched.update(_storage(infos[i][1]) for i in range(start, start + kid.num_leaves))
    start += kid.num_leaves
  buffers = {k: (v if k in touched else old.buffers[k]) for k, v in flat.buffers.items()}
  out = object.__new__(type(obj))
  object.__setattr__(out, "_packed", Flat(buffers, old.spec))
  return out


def is_shared(node) -> bool:
  """True for a node created by a :func:`shared_state` class (or :class:`Shared`)."""
  return getattr(type(node), _SHARED_FLAG, False)


class Clock:
  """Mixin for a shared state whose step bookkeeping lives in one int32[4] field
  ``clock`` = (count, last_exchange, num_exchanges, assign), read through properties.

  Every leaf of a step's state is a buffer the runtime handles on every device at every
  call; on forced CPU devices each replicated scalar costs about as much as a small
  fused kernel (benchmarks/overhead_ablation.py), so the four scalars travel as one.
  """

  @property
  def count(self):
    return self.clock[0]

  @property
  def last_exchange(self):
    return self.clock[1]

  @property
  def num_exchanges(self):
    return self.clock[2]

  @property
  def assign(self):
    return self.clock[3] != 0


def make_clock(count, last_exchange=0, num_exchanges=0, assign=False):
  """The ``clock`` field of a :class:`Clock` state."""
  return jnp.stack([jnp.asarray(count).astype(jnp.int32),
                    jnp.asarray(last_exchange).astype(jnp.int32),
                    jnp.asarray(num_exchanges).astype(jnp.int32),
                    jnp.asarray(assign).astype(jnp.int32)])


@shared_state
class Shared:
  """Wrap any pytree to mark it as shared (identical on all workers, not stacked)."""
  value: Any


def worker_axes(tree: PyTree, stacked=0, shared=None) -> PyTree:
  """A prefix tree of ``tree`` with ``shared`` at shared nodes and ``stacked`` elsewhere.

  Used as ``in_axes`` / ``out_axes`` (vmap, pmap) or ``in_specs`` (shard_map).
  """
  return jax.tree_util.tree_map(
      lambda node: shared if is_shared(node) else stacked, tree, is_leaf=is_shared)


def find_shared(tree: PyTree, attr: str = "count"):
  """First shared node in ``tree`` that has attribute ``attr`` (depth-first), or None."""
  nodes = jax.tree_util.tree_leaves(
      tree, is_leaf=lambda n: is_shared(n) and hasattr(n, attr))
  for n in nodes:
    if is_shared(n) and hasattr(n, attr):
      return n
  return None


# ----------------------------------------------------------------------------- checks


def check_positive_int(name: str, value, allow_none=False):
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def check_nonneg_int(name: str, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")


def check_range(name: str, value, lo, hi, lo_open=False, hi_open=False):
  """Raise ValueError unless ``value`` lies in the interval lo..hi (open or closed ends)."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"`{name}` must be a number, got {value!r}.") from None
  ok = not np.isnan(v)
  ok = ok and (v > lo if lo_open else v >= lo)
  ok = ok and (v < hi if hi_open else v <= hi)
  if not ok:
    lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
    raise ValueError(f"`{name}` must be in {lb}{lo}, {hi}{rb}, got {value!r}.")


def check_transform(name: str, tx):
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(
        f"`{name}` must be an optax GradientTransformation, got {type(tx).__name__}.")


def check_axis_name(axis_name: AxisName):
  """Raise ValueError if ``axis_name`` is not bound by an enclosing vmap/pmap/shard_map."""
  if not isinstance(axis_name, (str, tuple)) or (
      isinstance(axis_name, tuple) and not all(isinstance(a, str) for a in axis_name)):
    raise TypeError(f"`axis_name` must be a string or a tuple of strings, got {axis_name!r}.")
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  for n in names:
    try:
      jax.lax.axis_index(n)
    except NameError:
      raise ValueError(
          f"axis_name {n!r} is not bound: call this inside a function mapped over the "
          f"worker axis (wagrad.Runner, jax.vmap/pmap(axis_name=...) or jax.shard_map)."
      ) from None


def check_same_structure(name_a, a, name_b, b):
  sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  if sa != sb:
    raise TypeError(f"`{name_a}` and `{name_b}` have different pytree structures: {sa} vs {sb}.")


def require_value(algorithm: str, value):
  if value is None:
    raise TypeError(
        f"{algorithm} ranks workers by their loss: call "
        f"`tx.update(grads, state, params, value=loss)` with this worker's loss.")


def infer_num_workers(num_workers, axis_name):
  """K for length-K state vectors at ``init``: the argument if given, else the size of
  ``axis_name`` when it is bound (``wagrad.Runner.init`` binds it), else None."""
  if num_workers is not None:
    return int(num_workers)
  try:
    return int(jax.lax.psum(1, axis_name))
  except (NameError, TypeError):
    return None


# ----------------------------------------------------------------------------- periods


def make_period_fn(name: str, period: Period | None) -> Callable | None:
  """Turn an int or schedule into a function step -> int32 period (validated)."""
  if period is None:
    return None
  if callable(period):
    for probe in (0, 1, 2, 10, 100, 1000, 10_000, 100_000, 1_000_000):
      try:
        p = np.asarray(period(probe))
      except Exception as e:  # pragma: no cover - user schedule failing
        raise ValueError(f"`{name}` schedule failed at step {probe}: {e}") from e
      if p.ndim != 0 or not np.isfinite(p) or p < 1:
        raise ValueError(
            f"`{name}` schedule must return a period >= 1 for every step; "
            f"it returned {p!r} at step {probe}.")
    return lambda step: jnp.maximum(jnp.asarray(period(step)).astype(jnp.int32), 1)
  check_positive_int(name, period)
  return lambda step: jnp.int32(period)


def is_exchange_step(count, last_exchange, warmup_steps, period_fn):
  """The exchange predicate, computed from shared scalars only (decision 1).

  An exchange ends step ``count`` (0-based) when the warm-up is over and
  ``count + 1 - last_exchange >= period(count)``, ``last_exchange`` being the step
  count right after the previous exchange (or the warm-up's end). For an int period
  tau and no warm-up this is ``(count + 1) % tau == 0``.
  """
  if period_fn is None:
    return jnp.bool_(False)
  return (count >= warmup_steps) & (count + 1 - last_exchange >= period_fn(count))


# ----------------------------------------------------------------------------- trees


def tree_add(a, b):
  return jax.tree_util.tree_map(lambda x, y: x + y.astype(x.dtype), a, b)


def tree_sub(a, b):
  return jax.tree_util.tree_map(lambda x, y: x - y.astype(x.dtype), a, b)


def tree_where(pred, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def tree_cast_like(tree, like):
  return jax.tree_util.tree_map(lambda x, y: jnp.asarray(x).astype(y.dtype), tree, like)


def tree_zeros_like(tree):
  return jax.tree_util.tree_map(jnp.zeros_like, tree)


@jax.tree_util.register_pytree_node_class
class Flat:
  """A pytree stored as one flat vector per dtype, ``buffers = {dtype name: 1-D array}``
  (booleans are kept as 0 / 1 in the int32 buffer), that remembers its structure
  (static ``spec``), so :meth:`tree` rebuilds it.

  Parameter-shaped shared state (an exchange target, a center) travels like this: under
  XLA:CPU every leaf carried through a conditional or through the step's state costs a
  buffer per device and call; one flat buffer per dtype almost nothing
  (benchmarks/overhead_ablation.py). See ``shared_state(packed=True)``.
  """
  __slots__ = ("buffers", "spec")

  def __init__(self, buffers, spec=None):
    self.buffers = dict(buffers)
    self.spec = spec  # (treedef, ((shape, dtype name), ...)) or None

  def tree_flatten(self):
    keys = tuple(self.buffers)
    return [self.buffers[k] for k in keys], (keys, self.spec)

  @classmethod
  def tree_unflatten(cls, aux, children):
    keys, spec = aux
    return cls(dict(zip(keys, children)), spec)

  def tree(self, like=None):
    """The tree (shaped as ``like`` when given, else as when it was flattened)."""
    return unflatten(self, like)

  def __repr__(self):
    return f"Flat({ {k: getattr(v, 'shape', v) for k, v in self.buffers.items()} })"


# Booleans are stored in the int32 buffer (as 0 / 1) rather than in a buffer of their
# own: a state's flags then cost no extra buffer next to its counters.
_STORAGE = {"bool": "int32"}


def _storage(dt):
  return _STORAGE.get(dt, dt)


def _dtype_groups(infos):
  """storage dtype name -> indices of the leaves stored in that buffer (leaf order)."""
  groups = {}
  for i, (_, dt) in enumerate(infos):
    groups.setdefault(_storage(dt), []).append(i)
  return groups


def flat_spec(tree: PyTree):
  """The static structure :class:`Flat` records for ``tree`` (arrays or shape-dtype
  structs): (treedef, ((shape, dtype name), ...))."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), jnp.dtype(getattr(x, "dtype", None) or
                                                      jnp.asarray(x).dtype).name)
                        for x in leaves)


def concat_by_updates(vectors):
  """``jnp.concatenate`` of 1-D arrays of one dtype, written as a ``dynamic_update_slice``
  of each into a fresh buffer.

  XLA:CPU fuses a concatenate with the ops that produce its operands and, with some
  operand sizes (a 10-element bias beside a 64x1024 kernel), that fused loop is slow:
  on this project's CPU benchmarks, joining the 76,810 parameters of the "small" model
  that way took about 1 ms, the updates about 30 us
  (``benchmarks/concat.py``). For smaller vectors the concatenate is the faster one (each
  update is an op of its own), hence :func:`concat_auto`.
  """
  vectors = list(vectors)
  if len(vectors) == 1:
    return vectors[0]
  out = jnp.zeros((sum(v.shape[0] for v in vectors),), vectors[0].dtype)
  off = 0
  for v in vectors:
    out = jax.lax.dynamic_update_slice(out, v, (off,))
    off += v.shape[0]
  return out


def concat_by_concatenate(vectors):
  vectors = list(vectors)
  return vectors[0] if len(vectors) == 1 else jnp.concatenate(vectors)


# From this many elements on, concat_auto joins by updates (the "tiny" model's 19,210
# parameters join faster by concatenate, the "small" model's 76,810 by updates).
JOIN_BY_UPDATES_FROM = 1 << 15


def concat_auto(vectors):
  """:func:`concat_by_updates` for a vector of at least ``JOIN_BY_UPDATES_FROM``
  elements, a concatenate below."""
  vectors = list(vectors)
  big = sum(v.shape[0] for v in vectors) >= JOIN_BY_UPDATES_FROM
  return (concat_by_updates if big else concat_by_concatenate)(vectors)


JOINS = {"auto": concat_auto, "updates": concat_by_updates,
         "concatenate": concat_by_concatenate}


def check_join(join):
  if join not in JOINS:
    raise ValueError(f"unknown `join` {join!r}; choose one of {sorted(JOINS)}.")


def flatten(tree: PyTree, join: str = "auto") -> Flat:
  """Pack ``tree``'s leaves into :class:`Flat` (leaf order, grouped by dtype).

  ``join``: how the leaves of one dtype become one vector: ``"auto"`` (the default,
  :func:`concat_auto`: shared states and targets, whose parameter-sized fields are
  computed in the same program), ``"updates"`` or ``"concatenate"``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  leaves = [jnp.asarray(x) for x in leaves]
  infos = tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves)
  def stored(i, dt):
    x = leaves[i].ravel()
    return x.astype(dt) if x.dtype != dt else x
  check_join(join)
  cat = JOINS[join]
  return Flat({dt: cat([stored(i, dt) for i in idx])
               for dt, idx in _dtype_groups(infos).items()},
              (treedef, infos))


def unflatten(flat: Flat, like: PyTree = None) -> PyTree:
  """Inverse of :func:`flatten`. ``like`` (arrays or shape-dtype structs) gives the
  structure; without it the structure recorded by :func:`flatten` is used."""
  if like is None:
    if flat.spec is None:
      raise ValueError("this Flat has no recorded structure: pass `like`.")
    treedef, infos = flat.spec
  else:
    treedef, infos = flat_spec(like)
  return jax.tree_util.tree_unflatten(treedef, _unpack_leaves(flat, infos, range(len(infos))))


def _unpack_leaves(flat, infos, wanted):
  """The leaves ``wanted`` (indices into ``infos``) of a :class:`Flat`, in that order."""
  wanted = list(wanted)
  need = set(wanted)
  out = {}
  for sdt, idx in _dtype_groups(infos).items():
    buf = flat.buffers[sdt]
    off = 0
    for i in idx:
      shape, dt = infos[i]
      n = int(np.prod(shape, dtype=np.int64))
      if i in need:
        if isinstance(buf, jax.ShapeDtypeStruct):  # e.g. under jax.eval_shape
          out[i] = jax.ShapeDtypeStruct(shape, dt)
        elif hasattr(buf, "reshape"):
          x = buf[off:off + n].reshape(shape)
          out[i] = x if dt == sdt else x.astype(dt)
        else:  # a placeholder some JAX transformation put in place of the buffer
          out[i] = buf
      off += n
  return [out[i] for i in wanted]


def apply_updates(params: PyTree, updates: PyTree, opt_state: PyTree) -> PyTree:
  """``optax.apply_updates`` that takes the rule's target exactly on assigning steps.

  ``params + (target - params)`` is not ``target`` in floating point, so after an
  averaging exchange the workers would differ in their last bits. On steps where the
  wagrad transform in ``opt_state`` assigns (``shared.assign``), this returns
  ``shared.target`` (cast to the params' dtypes) instead; otherwise it is exactly
  ``optax.apply_updates``. Without a wagrad state in ``opt_state`` it is
  ``optax.apply_updates``.
  """
  new = optax.apply_updates(params, updates)
  sh = find_shared(opt_state, "assign")
  if sh is None or getattr(sh, "target", None) is None:
    return new
  target = sh.target
  if isinstance(target, Flat):
    target = unflatten(target, params)
  return jax.tree_util.tree_map(
      lambda t, n: jnp.where(sh.assign, t.astype(n.dtype), n), target, new)
