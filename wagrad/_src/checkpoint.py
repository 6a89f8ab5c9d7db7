"""Checkpoint and restore the whole training state (per-worker and shared) with orbax.

The state is flattened to its leaves before saving, so any pytree (optax states, wagrad
shared dataclasses, flax variables) round-trips; restoring needs a tree of the same
structure (e.g. the freshly initialised state) and gives back arrays that
:meth:`wagrad.Runner.put` places as the backend expects (design.md, Placement).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from wagrad._src.base import PyTree


def _checkpointer(alone):
  """orbax's checkpointer; ``alone``: only this process takes part (a multi-process
  run's master saving its own state), not every process of the run."""
  import orbax.checkpoint as ocp

  if not alone:
    return ocp.StandardCheckpointer()
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def save_checkpoint(path: str, tree: PyTree, *, force: bool = True, alone: bool = False) -> str:
  """Save ``tree`` under the directory ``path`` (absolute or relative) with orbax.
  ``alone``: this process saves by itself (every process takes part by default)."""
  path = os.path.abspath(path)
  leaves = jax.tree_util.tree_leaves(tree)
  payload = {f"{i:06d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
  with _checkpointer(alone) as ckptr:
    ckptr.save(path, payload, force=force)
  return path


def restore_checkpoint(path: str, like: PyTree, *, alone: bool = False) -> PyTree:
  """Restore a tree saved by :func:`save_checkpoint`, with the structure of ``like``."""
  path = os.path.abspath(path)
  leaves, treedef = jax.tree_util.tree_flatten(like)
  with _checkpointer(alone) as ckptr:
    payload = ckptr.restore(path)
  if len(payload) != len(leaves):
    raise ValueError(f"checkpoint at {path} has {len(payload)} arrays; the state to restore "
                     f"into has {len(leaves)}: not the same kind of state.")
  restored = []
  for i, ref in enumerate(leaves):
    x = np.asarray(payload[f"{i:06d}"])
    if x.shape != np.shape(ref):
      raise ValueError(f"checkpoint leaf {i} has shape {x.shape}, expected {np.shape(ref)}.")
    restored.append(x.astype(np.asarray(ref).dtype) if hasattr(ref, "dtype") else x)
  return jax.tree_util.tree_unflatten(treedef, restored)
