"""The asynchronous rules that rank workers, across processes: LSGD (the master keeps the
best leader reported) and WP-SGD (the master combines by workload). The protocol, the
start-up and the shared machinery: :mod:`wagrad._src.async_processes`.

Asynchronous LSGD (arXiv 1905.10395) [reconstruction]: worker i reports its
parameters and its running loss ``r_i`` after every tau-th of its steps; the master
keeps the best leader reported, ``if r_i < r_L: L <- x_i``, and answers ``L``; the
worker moves ``x_i <- x_i - pull (x_i - L)``: :class:`LSGDWorker`, :func:`serve_lsgd`.

WP-SGD on unequal workloads (arXiv 1708.04801) [reconstruction]: every worker steps at
its own speed, then sends its parameters and its step count ``t_i``; the master
answers every worker with ``sum_i s(t_i) x_i / sum_i s(t_i)``, the weights of
:func:`wagrad.wpsgd`: :class:`WPSGDWorker`, :func:`serve_wpsgd`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from wagrad._src import arguments
from wagrad._src import bulk
from wagrad._src import leaders
from wagrad._src import wpsgd as _wpsgd
from wagrad._src.async_serving import (answer_key, checkpoint, ignored_poll, join_backend,
                                       joined_key, outlive_workers, serve, serve_until,
                                       Worker)
from wagrad._src.base import PyTree

LSGD_PREFIX = "wagrad/lsgd"
WPSGD_PREFIX = "wagrad/wpsgd"


def master_lsgd(state: tuple, report: tuple) -> tuple[tuple, PyTree]:
  """Asynchronous LSGD's master for one report ``(x_i, r_i, i)``: the report becomes the
  leader when its running loss is finite and below the leader's and its parameters are
  finite. Answers the leader's parameters. ``state = (L, (r_L, leader))``; NumPy."""
  L, (best, leader) = state
  x, r, i = report
  r = float(np.asarray(r))
  finite = all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(x))
  if finite and np.isfinite(r) and r < best:
    L, best, leader = x, r, int(np.asarray(i))
  return (L, (best, leader)), L


class LSGDWorker(Worker):
  """One worker process of asynchronous LSGD.

  Use :meth:`apply_updates` in place of ``optax.apply_updates``, with the step's loss::

      worker = wagrad.async_.LSGDWorker(jax.process_index() - 1, sync_period=4, pull=0.1)
      for batch in batches:
        loss, g = jax.value_and_grad(loss_fn)(params, batch)
        u, opt_state = inner.update(g, opt_state, params)
        params = worker.apply_updates(params, u, loss)
      worker.close()

  After every ``sync_period``-th of its steps the worker reports its parameters and
  the mean of its last ``avg_size`` losses to the master (:func:`serve_lsgd`) and is
  pulled toward the leader it gets back, ``x <- x - pull (x - L)`` (the same pull as
  :func:`wagrad.lsgd`); a worker whose parameters are non-finite takes ``L``.

  Args:
    worker: this worker's index in ``[0, N)``.
    sync_period: tau >= 1, in this worker's own steps.
    pull: the pull's strength in (0, 1].
    avg_size: running-mean window of the losses (default ``sync_period``).
    timeout_s: longest wait for the master's answer (``TimeoutError`` after it).
  """

  _prefix = LSGD_PREFIX

  def __init__(self, worker: int, sync_period: int, *, pull: float = 0.1,
               avg_size: int | None = None, timeout_s: float = 120.0):
    super().__init__(worker, sync_period, timeout_s=timeout_s)
    leaders.check_pull("pull", pull)
    size = sync_period if avg_size is None else avg_size
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"`avg_size` must be an integer >= 1, got {avg_size!r}.")
    self.pull = float(pull)
    self.losses, self.num_losses = jax.numpy.zeros([size], jax.numpy.float32), 0

  def due(self) -> bool:
    """This step reports (``(clock + 1) mod tau == 0``)."""
    return (self.clock + 1) % self.tau == 0

  def running_loss(self) -> float:
    """The mean of the last ``avg_size`` losses (+inf before any)."""
    return float(leaders.running_mean(self.losses, self.num_losses))

  def apply_updates(self, params, updates, loss):
    """``params + updates``; on a report step, pulled toward the master's leader."""
    self.losses, self.num_losses = leaders.push_loss(self.losses, self.num_losses, loss, True)
    x = optax.apply_updates(params, updates)
    due, self.clock = self.due(), self.clock + 1
    if not due:
      return x
    host = jax.device_get(x)
    like = jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), v.dtype), host)
    report = (host, np.float32(self.running_loss()), np.int64(self.worker))
    L = self._ask(report, like)
    self.exchanges += 1
    if not all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(host)):
      return jax.tree_util.tree_map(jax.numpy.asarray, L)
    return leaders.pull(x, jax.tree_util.tree_map(jax.numpy.asarray, L), self.pull)


@arguments.checked_arguments(where="wagrad.async_")
def serve_lsgd(params0: PyTree, num_workers: int, *, order: Sequence[int] | None = None,
               timeout_s: float = 120.0, poll_s: float | None = None, check_s: float = 2.0,
               callback: Callable[[PyTree, np.ndarray], Any] | None = None,
               checkpoint_dir: str | None = None, checkpoint_every: int = 100
               ) -> tuple[PyTree, np.ndarray, list[int]]:
  """Run the master of asynchronous LSGD until every worker has closed: each report is
  served as it arrives (:func:`master_lsgd`); the leader starts at ``params0`` with
  loss +inf, so the first finite report becomes the leader.

  Args:
    params0: the initial parameters.
    num_workers: N, the number of worker processes.
    order, timeout_s, poll_s, check_s, callback, checkpoint_dir, checkpoint_every:
      as :func:`serve_easgd`.

  Returns:
    ``(leader, served, gone)``: the final leader's parameters (NumPy tree), the reports
    served per worker and the workers found dead.
  """
  join_backend()
  L = jax.tree_util.tree_map(lambda v: np.array(v), jax.device_get(params0))
  like = (jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), v.dtype), L),
          np.float32(0), np.int64(0))
  return serve(LSGD_PREFIX, (L, (np.inf, -1)), like, master_lsgd, num_workers, order,
                timeout_s, poll_s, check_s, callback,
                checkpoint=checkpoint(checkpoint_dir, checkpoint_every))


def wpsgd_scores(steps: Sequence[int], weighting: str = "samples",
                 learning_rate: float | None = None,
                 strong_convexity: float | None = None) -> np.ndarray:
  """WP-SGD's unnormalised weights ``s(t_i)`` of workers that ran ``steps`` local steps:
  the same function :func:`wagrad.wpsgd` weights with."""
  decay = _wpsgd.check_wpsgd_weighting(weighting, learning_rate, strong_convexity)
  code = _wpsgd.WEIGHTING_CODE[weighting]
  return np.asarray(_wpsgd.wpsgd_score(np.asarray(steps), code, decay), np.float64)


def master_wpsgd(models: Sequence[PyTree], steps: Sequence[int], **weighting) -> PyTree:
  """``sum_i s(t_i) x_i / sum_i s(t_i)`` over the finite models (:func:`wpsgd_scores`);
  NumPy, float64 sums, each leaf back in its dtype. ``ValueError`` when no worker has
  weight."""
  s = wpsgd_scores(steps, **weighting)
  finite = [all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(m)) for m in models]
  s = np.where(finite, s, 0.0)
  if not s.sum() > 0:
    raise ValueError(f"no worker has weight (steps {list(steps)}, finite {finite}).")
  w = s / s.sum()
  return jax.tree_util.tree_map(
      lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs) if wi > 0
                      ).astype(np.asarray(xs[0]).dtype), *models)


class WPSGDWorker(Worker):
  """One worker process of WP-SGD on unequal workloads.

  The worker trains at its own speed with any optimizer, counting its steps through
  :meth:`apply_updates`, for a wall-clock budget (or any stopping rule of its own);
  then :meth:`combine` sends its model and step count and returns the master's
  weighted combination (:func:`serve_wpsgd`), the same model on every worker::

      worker = wagrad.async_.WPSGDWorker(jax.process_index() - 1, budget_s=60.0)
      while worker.running():
        u, opt_state = inner.update(jax.grad(loss_fn)(params, batch), opt_state, params)
        params = worker.apply_updates(params, u)
      params = worker.combine(params)
      worker.close()

  Args:
    worker: this worker's index in ``[0, N)``.
    budget_s: wall-clock seconds of training from the end of the first step (None: no
      budget; :meth:`running` is then always True).
    timeout_s: longest wait for the combination (``TimeoutError`` after it).
  """

  _prefix = WPSGD_PREFIX

  def __init__(self, worker: int, *, budget_s: float | None = None, timeout_s: float = 120.0):
    super().__init__(worker, 1, timeout_s=timeout_s)
    if budget_s is not None and not budget_s > 0:
      raise ValueError(f"`budget_s` must be > 0 seconds or None, got {budget_s!r}.")
    self.budget_s, self.start = budget_s, None

  def running(self) -> bool:
    """The wall-clock budget is not spent yet (it starts at the first step's end, after
    the step's compilation)."""
    return (self.budget_s is None or self.start is None
            or time.monotonic() - self.start < self.budget_s)

  def apply_updates(self, params, updates):
    """``params + updates``, one local step counted."""
    if self.start is None:
      self.start = time.monotonic()
    self.clock += 1
    return optax.apply_updates(params, updates)

  def combine(self, params):
    """Send this worker's model and step count; return the weighted combination."""
    host = jax.device_get(params)
    like = jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), v.dtype), host)
    out = self._ask((host, np.int64(self.clock)), like)
    self.exchanges += 1
    return jax.tree_util.tree_map(lambda x, v: jax.numpy.asarray(v, x.dtype), params, out)


@arguments.checked_arguments(where="wagrad.async_")
def serve_wpsgd(params0: PyTree, num_workers: int, *, weighting: str = "samples",
                learning_rate: float | None = None, strong_convexity: float | None = None,
                timeout_s: float = 120.0, poll_s: float | None = None, check_s: float = 2.0
                ) -> tuple[PyTree, np.ndarray, list[int]]:
  """Run WP-SGD's master: wait for every live worker's model and step count, then
  answer each with the weighted combination (:func:`master_wpsgd`, the weights of
  :func:`wagrad.wpsgd`: ``weighting`` ``"samples"`` (default, s = t_i),
  ``"contraction"`` (with ``learning_rate`` and ``strong_convexity``) or
  ``"uniform"``). A worker found dead while waiting is left out.

  Returns:
    ``(model, steps, gone)``: the combination (NumPy tree), each worker's step count
    (-1 for the ones left out) and the workers found dead.
  """
  wpsgd_scores([1], weighting, learning_rate, strong_convexity)  # check the rule first
  join_backend()
  x0 = jax.device_get(params0)
  like = (jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), np.asarray(v).dtype), x0),
          np.int64(0))
  got: dict[int, tuple] = {}
  answers: dict[int, tuple] = {}  # worker -> (count, incarnation) its request named

  def handle(i, data, k, token):
    if data is None:  # a restarted worker starts again from params0
      joined = (x0, np.int64(0), np.int64(0))
      bulk.send(joined_key(WPSGD_PREFIX, i, token), joined)
    else:
      got[i], answers[i] = bulk.decode(data, like, timeout_s), (k, token)
  ignored_poll(poll_s)
  gone = serve_until(WPSGD_PREFIX, num_workers, handle, lambda: set(got), timeout_s, check_s)
  ids = sorted(got)
  model = master_wpsgd([got[i][0] for i in ids], [int(got[i][1]) for i in ids],
                       weighting=weighting, learning_rate=learning_rate,
                       strong_convexity=strong_convexity)
  for i in ids:
    bulk.send(answer_key(WPSGD_PREFIX, i, *answers[i]), model)
  steps = np.array([int(got[i][1]) if i in got else -1 for i in range(num_workers)])
  outlive_workers(timeout_s)
  return model, steps, sorted(gone)


