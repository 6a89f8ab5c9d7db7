"""Shared building blocks of every wagrad transform.

Two kinds of state (design.md, Two kinds of state):

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
(design.md, Exact assignment).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# A named worker axis: a name, or a tuple of names ordered outer to inner
# (what check_axis_name accepts).
AxisName = Union[str, tuple[str, ...]]
# A period: an integer >= 1, or a schedule ``step -> period`` (see make_period_fn).
Period = Union[int, Callable[[Any], Any]]

_SHARED_FLAG = "__wagrad_shared__"


@typing.dataclass_transform(frozen_default=True)
def shared_state(cls: type[Any]) -> type[Any]:
  """Class decorator: a frozen dataclass pytree whose leaves are shared by all workers.

  The fields are plain pytrees (``state.shared.center`` is the center tree itself);
  printing, ``tree_map`` and checkpoints show them by name. The parallel runners map
  every leaf below such a node with ``in_axes=None`` / ``P()``.
  """
  cls = dataclasses.dataclass(frozen=True)(cls)
  setattr(cls, _SHARED_FLAG, True)
  return jax.tree_util.register_dataclass(
      cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])


def is_shared(node: Any) -> bool:
  """True for a node created by a :func:`shared_state` class (or :class:`Shared`)."""
  return getattr(type(node), _SHARED_FLAG, False)


def clock(count, last_exchange=0, num_exchanges=0, assign=False) -> dict:
  """The four step-bookkeeping fields every periodic shared state has, as keyword
  arguments: ``count`` (the global step, which alone decides exchanges),
  ``last_exchange`` (the count right after the last exchange or the warm-up's end),
  ``num_exchanges`` and ``assign`` (this step assigns ``target`` exactly, see
  :func:`apply_updates`)."""
  i32 = lambda v: jnp.asarray(v).astype(jnp.int32)  # noqa: E731
  return dict(count=i32(count), last_exchange=i32(last_exchange),
              num_exchanges=i32(num_exchanges), assign=jnp.asarray(assign, jnp.bool_))


@shared_state
class Shared:
  """Wrap any pytree to mark it as shared (identical on all workers, not stacked)."""
  value: Any


def unshared(x):
  """``x.value`` for a :class:`Shared` wrapper, else ``x``: per-step inputs of a transform
  (``any_exchange=``, ``apply=``, ...) may be passed either way."""
  return x.value if isinstance(x, Shared) else x


def worker_axes(tree: PyTree, stacked=0, shared=None) -> PyTree:
  """A prefix tree of ``tree`` with ``shared`` at shared nodes and ``stacked`` elsewhere.

  Used as ``in_axes`` / ``out_axes`` (vmap, pmap) or ``in_specs`` (shard_map).
  """
  return jax.tree_util.tree_map(
      lambda node: shared if is_shared(node) else stacked, tree, is_leaf=is_shared)


def find_shared(tree: PyTree, attr: str = "count") -> Any | None:
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
          f"worker axis (wagrad.Runner, jax.vmap/pmap(axis_name=...) or jax.shard_map) "
          f"and build the transform with that axis, e.g. axis_name=runner.axis_name (a "
          f"Runner with more workers than devices, or with groups, has no axis called "
          f"'workers': its runner.axis_name is a tuple of two axes)."
      ) from None


def check_same_structure(name_a, a, name_b, b):
  sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  if sa != sb:
    raise TypeError(f"`{name_a}` and `{name_b}` have different pytree structures: {sa} vs {sb}.")


def require_value(algorithm: str, value):
  if value is None:
    raise TypeError(
        f"{algorithm} ranks workers by their loss: call "
        f"`tx.update(grads, state, params, value=loss)` with this worker's loss (Flax: "
        f"`wagrad.nnx_update(optimizer, model, grads, value=loss)`; linen's "
        f"`TrainState.apply_gradients` does not forward it, see README's Flax section).")


RENAMED_FLAGS = ("any_push", "any_report", "exchange")


def refuse_renamed_flags(algorithm: str, extra: dict) -> None:
  """The per-step shared flag has one name, ``any_exchange=``: an old name would reach
  the inner optimizer and do nothing, so it is refused by name."""
  for old in RENAMED_FLAGS:
    if old in extra:
      raise TypeError(
          f"{algorithm}: the per-step shared flag is called `any_exchange=` now (was "
          f"`{old}=`): tx.update(grads, state, params, ..., any_exchange=flag).")


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


_PYTHON_CONTROL_FLOW = (jax.errors.TracerBoolConversionError,
                        jax.errors.TracerIntegerConversionError,
                        jax.errors.ConcretizationTypeError)


def make_period_fn(name: str, period: Period | None) -> Callable | None:
  """Turn an int or schedule into a function step -> int32 period (validated).

  A schedule is called with the traced global step inside the jitted step, so it must
  be traceable (``jnp.where``, not a Python ``if``). Its value is rounded to the
  nearest integer and a value below 1 counts as 1 (an exchange every step): an optax
  schedule's 2.9 is a period of 3. It is checked at construction on a few steps
  (0, 1, 2, 10, ..., 10**6) for a finite value >= 1."""
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
    def traced(step):
      try:
        p = period(step)
      except _PYTHON_CONTROL_FLOW as e:
        raise TypeError(
            f"`{name}` schedule uses Python control flow on the step "
            f"({type(e).__name__}); inside the jitted step the step is a traced array: "
            f"write it with jnp.where / jnp.minimum, e.g. "
            f"`lambda t: jnp.where(t < 1000, 4, 16)`.") from None
      return jnp.maximum(jnp.round(jnp.asarray(p)).astype(jnp.int32), 1)
    return traced
  check_positive_int(name, period)
  return lambda step: jnp.int32(period)


def is_exchange_step(count, last_exchange, warmup_steps, period_fn):
  """The exchange predicate, computed from shared scalars only (design.md, One clock).

  An exchange ends step ``count`` (0-based) when the warm-up is over and
  ``count + 1 - last_exchange >= period(count)``, ``last_exchange`` being the step
  count right after the previous exchange (or the warm-up's end). For an int period
  tau and no warm-up this is ``(count + 1) % tau == 0``.
  """
  if period_fn is None:
    return jnp.bool_(False)
  return (count >= warmup_steps) & (count + 1 - last_exchange >= period_fn(count))


# ----------------------------------------------------------------------------- trees


def axis_tuple(axis: AxisName) -> tuple[str, ...]:
  """An axis name as a tuple of names."""
  return axis if isinstance(axis, tuple) else (axis,)


def f32(x):
  """``x`` as float32, or wider if it already is (accumulation dtype)."""
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def tree_add(a, b):
  return jax.tree_util.tree_map(lambda x, y: x + y.astype(x.dtype), a, b)


def tree_sub(a, b):
  return jax.tree_util.tree_map(lambda x, y: x - y.astype(x.dtype), a, b)


def tree_where(pred, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def tree_cast_like(tree, like):
  return jax.tree_util.tree_map(lambda x, y: jnp.asarray(x).astype(y.dtype), tree, like)


def tree_copy(tree):
  """A copy of every leaf: what ``init`` stores next to the parameters (a center, a
  target, a leader copy) must not be the parameters' own buffers, or donating both
  would hand XLA one buffer twice."""
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def pure(tree):
  """Flax NNX containers replaced by plain pytrees: an ``nnx.State`` by its pure dict, a
  variable (``nnx.Param``, optimizer state) by its array; anything else unchanged."""
  is_state = lambda v: hasattr(v, "to_pure_dict")  # noqa: E731  an nnx.State
  is_var = lambda v: is_state(v) or hasattr(v, "get_value")  # noqa: E731

  def plain(v):
    if is_state(v):  # nnx.to_pure_dict, not the deprecated State.to_pure_dict method
      from flax import nnx
      return nnx.to_pure_dict(v)
    return v.get_value() if hasattr(v, "get_value") else v

  return jax.tree_util.tree_map(plain, tree, is_leaf=is_var)


def apply_updates(params: PyTree, updates: PyTree, opt_state: PyTree) -> PyTree:
  """``optax.apply_updates`` that takes the rule's target exactly on assigning steps.

  ``params + (target - params)`` is not ``target`` in floating point, so after an
  averaging exchange the workers would differ in their last bits. On steps where a
  wagrad transform in ``opt_state`` assigns (``shared.assign``), this returns
  ``shared.target`` (cast to the params' dtypes) instead; otherwise it is exactly
  ``optax.apply_updates``. Without a wagrad state in ``opt_state`` it is
  ``optax.apply_updates``. Under ``optax.multi_transform`` each wagrad transform
  assigns only the parameters of its own label (the others are masked in its target).
  A worker whose state says ``reset`` takes the shared value of the rule exactly: a
  non-finite EASGD / LSGD worker at an exchange (center, leader), a learner of
  staleness-aware SGD that pulled the server's parameters.
  """
  return take_assigned(optax.apply_updates(params, updates), opt_state)


def is_wagrad_state(node: Any) -> bool:
  """True for the state of a wagrad transform (a state with a shared part)."""
  return is_shared(getattr(node, "shared", None))


def check_outermost(opt_state: PyTree) -> None:
  """Refuse a wagrad transform followed by other transforms in an ``optax.chain``.

  A chain's state is a plain tuple of its transforms' states in order; a transform
  after wagrad's would rescale the exchange (an averaging step is ``target - params``
  in the updates). Transforms before it only see gradients, which is allowed."""
  def walk(node):
    if is_wagrad_state(node):
      return
    if type(node) is tuple:  # optax.chain (NamedTuple states are other transforms')
      for i, child in enumerate(node[:-1]):
        if is_wagrad_state(child):
          raise ValueError(
              f"a wagrad transform is element {i} of an optax.chain of {len(node)} "
              f"transforms, followed by others: wagrad must be the outermost transform "
              f"(README, 'wagrad is the outermost transform'), or the ones after it "
              f"rescale the exchange. Put them inside it as its inner optimizer, e.g. "
              f"wagrad.model_averaging(optax.chain(optax.clip(1.0), optax.sgd(0.1)), "
              f"sync_period=8).")
    for child in (node.values() if isinstance(node, dict) else
                  node if isinstance(node, (tuple, list)) else ()):
      walk(child)
  walk(opt_state)


def take_assigned(new: PyTree, opt_state: PyTree) -> PyTree:
  """The parameters ``new`` (after ``params + updates``) with the rule's exact values
  taken where ``opt_state`` assigns: ``shared.target`` on assigning steps, the shared
  value of the rule for a worker whose state says ``reset`` (see :func:`apply_updates`).
  Refuses a wagrad transform that is not the outermost (:func:`check_outermost`)."""
  check_outermost(opt_state)
  for sh in _nodes(opt_state, lambda n: is_shared(n) and hasattr(n, "assign")):
    if getattr(sh, "target", None) is not None:
      new = _take(sh.assign, sh.target, new)
  # a worker reset this step takes the rule's shared value exactly, per worker: EASGD's
  # center or LSGD's leader for a worker whose parameters went non-finite (no additive
  # update can repair them), the server for a learner that pulled it (staleness-aware)
  for st in _nodes(opt_state, lambda n: getattr(n, "reset", None) is not None
                   and hasattr(n, "shared")):
    new = jax.lax.cond(st.reset, lambda v, n: _take(True, v, n), lambda v, n: n,
                       st.shared.reset_value, new)
  return new


def _nodes(tree, pred):
  return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=pred) if pred(n)]


def _take(pred, value, new):
  """``value`` where ``pred`` (one flag, or a tree of flags like ``value``), else
  ``new``, leaf by leaf in ``new``'s dtypes; leaves of
  ``value`` masked by ``optax.multi_transform`` (other labels) keep ``new``."""
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  if not isinstance(pred, (bool, np.generic, np.ndarray, jax.Array)):  # a flag per leaf
    return jax.tree_util.tree_map(
        lambda t, n, p: n if masked(t) else jnp.where(p, t.astype(n.dtype), n),
        value, new, pred, is_leaf=masked)
  return jax.tree_util.tree_map(
      lambda t, n: n if masked(t) else jnp.where(pred, t.astype(n.dtype), n),
      value, new, is_leaf=masked)
