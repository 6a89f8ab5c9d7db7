"""Seeded simulation of time: heterogeneous speeds, stragglers, dropped workers.

Asynchronous behaviour is *precomputed in NumPy* as per-step tables and fed to the
jitted SPMD step, so every collective is still decided by the global step
(design.md, One clock). A row ``active[t]`` (shape ``[K]``, bool) says which
workers finish a local step during global step ``t``; an inactive worker keeps its
state unchanged and joins collectives with weight 0. Pass ``active[t]`` to the mapped
step as a per-worker argument (leading dimension K).

Everything here is deterministic for a given seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import numpy.typing as npt

from wagrad._src import arguments


@arguments.checked_arguments(where="wagrad.schedules")
def speed_schedule(num_workers: int, num_steps: int, speeds: npt.ArrayLike | None = None, *,
                   seed: int = 0, jitter: float = 0.0) -> np.ndarray:
  """Activity masks ``[num_steps, num_workers]`` for workers of relative speeds.

  Worker i with speed ``s_i`` in (0, 1] completes ``s_i`` local steps per global step
  on average (1.0 = the fastest possible worker, active every step; 0.25 = 4x slower).
  Worker i is active at step t when ``floor((t+1) s_i + phi_i) > floor(t s_i + phi_i)``
  with a seeded phase ``phi_i`` in [0, 1), so over T steps it is active
  ``T s_i`` (+-1) times. ``jitter`` > 0 additionally drops each activation with that
  probability (seeded), for random stragglers.

  Args:
    num_workers: K.
    num_steps: T.
    speeds: sequence of K speeds in (0, 1] (default all 1.0).
    seed: seed of the phases and jitter.
    jitter: probability in [0, 1) of skipping an activation.

  Returns:
    bool array ``[T, K]``.
  """
  if num_workers < 1 or num_steps < 0:
    raise ValueError(f"need num_workers >= 1 and num_steps >= 0, got {num_workers}, {num_steps}.")
  s = np.ones(num_workers) if speeds is None else np.asarray(speeds, dtype=np.float64)
  if s.shape != (num_workers,):
    raise ValueError(f"`speeds` must have {num_workers} entries, got shape {s.shape}.")
  if not np.all((s > 0) & (s <= 1)):
    raise ValueError(f"`speeds` must lie in (0, 1], got {s.tolist()}.")
  if not 0 <= jitter < 1:
    raise ValueError(f"`jitter` must be in [0, 1), got {jitter}.")
  rng = np.random.default_rng(seed)
  phase = rng.uniform(0, 1, size=num_workers)
  phase[s >= 1] = 0.0
  t = np.arange(num_steps)[:, None]
  active = np.floor((t + 1) * s + phase) > np.floor(t * s + phase)
  if jitter > 0:
    active &= rng.uniform(size=active.shape) >= jitter
  return active


@arguments.checked_arguments(where="wagrad.schedules")
def drop_workers(active: np.ndarray, worker: int | Sequence[int] | np.ndarray, start: int,
                 stop: int) -> np.ndarray:
  """Copy of ``active`` with ``worker`` (int or list) inactive for steps [start, stop)."""
  out = np.array(active, dtype=bool, copy=True)
  out[start:stop, worker] = False
  return out


@arguments.checked_arguments(where="wagrad.schedules")
def straggler_speeds(num_workers: int, slow_fraction: float = 0.25, slowdown: float = 4.0
                     ) -> np.ndarray:
  """Speeds with the last ``round(K * slow_fraction)`` workers ``slowdown`` x slower."""
  if slowdown < 1:
    raise ValueError(f"`slowdown` must be >= 1, got {slowdown}.")
  s = np.ones(num_workers)
  n_slow = int(round(num_workers * slow_fraction))
  if n_slow:
    s[-n_slow:] = 1.0 / slowdown
  return s
