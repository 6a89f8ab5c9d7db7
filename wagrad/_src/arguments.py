"""Constructor arguments checked by type, in one place (design.md, One calling
convention).

:func:`checked_arguments` decorates every public transform: from each argument's
annotation it knows which take a number, a schedule or an optax transform, and a
value of the wrong kind (a transform where a number goes, a string, a tree) raises a
``TypeError`` that names the argument and shows the call. Ranges stay with each
constructor's own checks (``base.check_range`` and the like).
"""

from __future__ import annotations

import functools
import inspect
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _is_transform(value) -> bool:
  return hasattr(value, "init") and hasattr(value, "update")


def _is_number(value) -> bool:
  if isinstance(value, bool):
    return False
  if isinstance(value, numbers.Real):
    return True
  return (isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0
          and jnp.issubdtype(value.dtype, jnp.number))


def _describe(value) -> str:
  if _is_transform(value):
    return f"an optax transform ({type(value).__name__})"
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


def _argument_kind(annotation: str) -> tuple[str, bool, bool] | None:
  """(what, schedule allowed, None allowed) for a constructor argument, by its
  annotation; None for arguments checked elsewhere (strings, flags, tuples, axes)."""
  a = str(annotation)
  if any(k in a for k in ("str", "bool", "AxisName", "Sequence")):
    return None
  if "tuple" in a:  # a pair per level (tree EASGD)
    kind = _argument_kind(a[a.index("[") + 1:a.index(",")])
    return None if kind is None else ("pair " + kind[0], kind[1], "None" in a)
  if "GradientTransformation" in a and "ScalarOrSchedule" not in a:
    return "transform", False, "None" in a
  if any(k in a for k in ("float", "int", "Period", "ScalarOrSchedule")):
    return "number", "Period" in a or "Schedule" in a, "None" in a
  return None


def checked_arguments(fn=None, *, where: str = "wagrad"):
  """Decorator for a public constructor: every numeric argument is a number (or a
  schedule where its annotation says so) and every optimizer argument an optax
  transform, checked by type at construction; a ``TypeError`` names the argument and
  the call (``where``: the namespace the user calls it from, e.g.
  ``"wagrad.schedules"``). Ranges are the constructor's own checks."""
  if fn is None:
    return functools.partial(checked_arguments, where=where)
  qualname = f"{where}.{fn.__name__}"
  sig = inspect.signature(fn)
  kinds = {n: k for n, p in sig.parameters.items()
           if (k := _argument_kind(p.annotation)) is not None}
  inner_first = next(iter(sig.parameters), None) == "inner"

  def example(name):
    d = sig.parameters[name].default
    shown = "..." if d is inspect.Parameter.empty or d is None else repr(d)
    first = "optax.sgd(0.1)" + ("" if name == "inner" else ", ")
    return (f"{qualname}({first if inner_first else ''}"
            f"{'' if name == 'inner' else f'{name}={shown}'})")

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      bound = sig.bind(*args, **kwargs)
    except TypeError as e:
      raise TypeError(_call_error(qualname, sig, e, args, inner_first)) from None
    for name, value in bound.arguments.items():
      kind = kinds.get(name)
      if kind is None or value is None:  # None: the constructor says what to give
        continue
      what, schedule, _ = kind
      items = [value]
      if what.startswith("pair "):  # one per level; its length is the constructor's check
        what = what[5:]
        items = list(value) if isinstance(value, (tuple, list)) else [value]
      for item in (i for i in items if i is not None):
        check_argument_type(qualname, name, item, what, schedule, inner_first,
                            sig.parameters[name].annotation, example)
    return fn(*args, **kwargs)

  return wrapper


def _call_error(fn_name, sig, error, args, inner_first) -> str:
  """A call that does not bind: what was wrong, how the call reads, its keywords."""
  params = sig.parameters.values()
  positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
  keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
  first = ("optax.sgd(0.1)" if inner_first else positional[0] if positional else "")
  call = ", ".join([first] + [f"{n}=..." for n in positional[1:]]) if first else ""
  hint = (" Every wagrad transform takes its inner optimizer first and its period "
          "second." if inner_first and args and not _is_transform(args[0]) else "")
  return (f"{fn_name}: {error}.{hint} The call reads {fn_name}({call}); "
          f"its keyword arguments: {', '.join(keywords)}.")


def check_argument_type(fn_name, name, value, what, schedule, inner_first, annotation,
                        example):
  """One argument's type check of :func:`checked_arguments`."""
  if what == "transform":
    if not _is_transform(value):
      raise TypeError(
          f"{fn_name}: `{name}` must be an optax GradientTransformation, "
          f"got {_describe(value)}. Every wagrad transform takes its inner optimizer "
          f"first and its period second: {example(name)}.")
  elif not (_is_number(value) or (schedule and callable(value))
            or ("GradientTransformation" in str(annotation) and _is_transform(value))):
    expect = "a number or a schedule (step -> value)" if schedule else "a number"
    hint = (f" The inner optimizer goes first: {example(name)}." if _is_transform(value)
            and inner_first else f" For example {example(name)}.")
    raise TypeError(
        f"{fn_name}: `{name}` must be {expect}, got {_describe(value)}.{hint}")
