"""WASGD+'s designed sample order: the same batch for every worker at exchange steps.

[reconstruction] The WASGD paper's abstract (arXiv 2004.03749) names "a designed sample
order" for WASGD+ without details available here. With ``loss_source="exchange_batch"``
(:func:`wagrad.wasgd_plus`) the losses that are weighted are the minibatch losses of the
exchange step; :func:`wasgd_plus_sample_order` makes them comparable by giving every
worker the same batch there, drawn from a shared seeded pass over all examples, and
each worker its own seeded pass (over its shard, or over all examples) on the other
steps. A seeded NumPy table of which the training loop reads one row per step
(``wagrad.schedules``).

References:
  "Weighted Aggregating Stochastic Gradient Descent for Parallel Deep Learning",
  IEEE TKDE 34(10), 2022, arXiv 2004.03749 (reconstruction from the abstract).
"""

from __future__ import annotations

import numpy as np

from wagrad._src import arguments
from wagrad._src import base


@arguments.checked_arguments(where="wagrad.schedules")
def wasgd_plus_sample_order(num_examples: int, num_workers: int, batch_size: int,
                            steps: int, sync_period: int, seed: int = 0, *,
                            warmup_steps: int = 0, disjoint: bool = True) -> np.ndarray:
  """WASGD+'s designed sample order: the same batch for every worker at exchange steps.

  Reconstruction from the paper's abstract (arXiv 2004.03749), which names "a designed
  sample order" without details available here. At an exchange step ``t`` (``t >=
  warmup_steps`` and ``(t + 1 - warmup_steps) % sync_period == 0``, the steps on which
  :func:`wasgd_plus` with an int ``sync_period`` exchanges) every worker gets the same
  batch, drawn from a shared seeded pass over all examples, so the losses that
  ``loss_source="exchange_batch"`` weights are comparable. On the other steps worker i
  draws from its own seeded pass over its shard (examples of a seeded split into K
  disjoint parts, ``disjoint=True``) or over all examples (``disjoint=False``).
  Deterministic for a given seed.

  Args:
    num_examples: n, size of the training set.
    num_workers: K.
    batch_size: examples per worker per step.
    steps: number of steps T.
    sync_period: tau >= 1 (an int).
    seed: seed of every pass.
    warmup_steps: the transform's warm-up (exchanges start after it).
    disjoint: private batches from disjoint shards (default) or from all examples.

  Returns:
    int64 array ``[T, K, batch_size]`` of example indices: row ``[t, i]`` is worker i's
    batch at step t.

  Example:
    >>> import wagrad
    >>> order = wagrad.schedules.wasgd_plus_sample_order(100, 2, 4, steps=6, sync_period=3)
    >>> bool((order[2, 0] == order[2, 1]).all())
    True
  """
  for nm, v in (("num_examples", num_examples), ("num_workers", num_workers),
                ("batch_size", batch_size), ("sync_period", sync_period)):
    base.check_positive_int(nm, v)
  base.check_nonneg_int("steps", steps)
  base.check_nonneg_int("warmup_steps", warmup_steps)
  K, B = int(num_workers), int(batch_size)
  if B > num_examples:
    raise ValueError(f"`batch_size`={B} exceeds `num_examples`={num_examples}.")
  if disjoint and num_examples // K < B:
    raise ValueError(
        f"`num_examples`={num_examples} split over {K} workers leaves fewer than "
        f"`batch_size`={B} examples per shard; use disjoint=False or a smaller batch.")

  def stream(rng, pool):
    pool = np.asarray(pool, np.int64)
    buf = np.empty(0, np.int64)
    while True:
      while buf.size < B:
        buf = np.concatenate([buf, rng.permutation(pool)])
      out, buf = buf[:B], buf[B:]
      yield out

  split = np.random.default_rng([seed, 0]).permutation(num_examples)
  shared = stream(np.random.default_rng([seed, 1]), np.arange(num_examples))
  private = [stream(np.random.default_rng([seed, 2, i]),
                    split[i::K] if disjoint else np.arange(num_examples)) for i in range(K)]
  t = np.arange(steps)
  exch = (t >= warmup_steps) & ((t + 1 - warmup_steps) % sync_period == 0)
  out = np.empty((steps, K, B), np.int64)
  for s in range(steps):
    if exch[s]:
      out[s] = next(shared)[None]
    else:
      for i in range(K):
        out[s, i] = next(private[i])
  return out
