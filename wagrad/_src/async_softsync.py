"""Staleness-aware n-softsync SGD across processes (arXiv 1511.05950): a learner pushes
the gradient of the parameters it last pulled (server version ``v_l``) and pulls the
server's current parameters; the server applies ``theta <- theta - (1/c) sum_l (alpha0 /
tau_l) g_l`` once it holds c = lambda / n gradients, ``tau_l = max(V - v_l, 1)`` the
gradient's staleness in server updates (``alpha0`` alone with ``modulation="none"``,
plain ASGD): :class:`SoftsyncLearner`, :func:`serve_softsync`. The same rule inside one
program: :func:`wagrad._src.staleness.staleness_aware_sgd`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from wagrad._src import arguments
from wagrad._src.async_serving import checkpoint, f32_zeros, join_backend, serve, Worker
from wagrad._src.base import PyTree

SOFTSYNC_PREFIX = "wagrad/softsync"


def _softsync_saved(state, theta0, c):
  """The softsync server's state as a tree of fixed structure: the buffer of up to
  c - 1 scaled gradients stacked and padded with zeros to c rows, and its length."""
  theta, (version, buffer) = state
  rows = buffer + [f32_zeros(theta0)] * (c - len(buffer))
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *rows)
  return theta, np.int64(version), stacked, np.int64(len(buffer))


def _softsync_state(saved):
  theta, version, stacked, n = saved
  buffer = [jax.tree_util.tree_map(lambda x, j=j: np.asarray(x[j]), stacked)
            for j in range(int(n))]
  return theta, (int(version), buffer)


def master_softsync(state: tuple, push: tuple, alpha0: float, c: int,
                    modulation: str = "inverse") -> tuple[tuple, tuple]:
  """The n-softsync server for one push ``(g, v)``: the gradient joins the buffer with
  staleness ``V - v``; with c gradients there, ``theta <- theta - (1/c) sum_l (alpha0 /
  max(tau_l, 1)) g_l`` and ``V <- V + 1``. Answers ``(theta, V)``. ``state = (theta,
  (V, buffer))``; NumPy, float32 arithmetic."""
  theta, (version, buffer) = state
  g, v = push
  tau = max(version - int(np.asarray(v)), 1) if modulation == "inverse" else 1
  buffer = buffer + [jax.tree_util.tree_map(lambda x: np.float32(alpha0 / tau) * x, g)]
  if len(buffer) >= c:
    step = jax.tree_util.tree_map(lambda *xs: sum(xs) / np.float32(c), *buffer)
    theta = jax.tree_util.tree_map(
        lambda t, d: (np.asarray(t, np.float32) - d).astype(np.asarray(t).dtype), theta, step)
    version, buffer = version + 1, []
  return (theta, (version, buffer)), (theta, np.int64(version))


class SoftsyncLearner(Worker):
  """One learner process of staleness-aware n-softsync SGD.

  Each step, in place of the local update::

      learner = wagrad.async_.SoftsyncLearner(jax.process_index() - 1)
      for batch in batches:
        params = learner.push_pull(params, jax.grad(loss_fn)(params, batch))
      learner.close()

  :meth:`push_pull` sends the gradient with the server version its parameters came
  from and returns the server's current parameters (:func:`serve_softsync`).
  """

  _prefix = SOFTSYNC_PREFIX

  def __init__(self, worker: int, *, timeout_s: float = 120.0):
    super().__init__(worker, 1, timeout_s=timeout_s)
    self.version = 0     # the server version of the parameters last pulled

  def push_pull(self, params, grads):
    """Push ``grads`` (taken at ``params``); return the server's parameters."""
    host = jax.device_get(grads)
    like = (jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), x.dtype), params),
            np.int64(0))
    g32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), host)
    theta, version = self._ask((g32, np.int64(self.version)), like)
    self.version, self.exchanges = int(version), self.exchanges + 1
    return jax.tree_util.tree_map(lambda x, t: jax.numpy.asarray(t, x.dtype), params, theta)

  def _joined(self, version):
    self.version = version



@arguments.checked_arguments(where="wagrad.async_")
def serve_softsync(params0: PyTree, num_learners: int, n: int, *, alpha0: float,
                   modulation: str = "inverse", order: Sequence[int] | None = None,
                   timeout_s: float = 120.0, poll_s: float | None = None, check_s: float = 2.0,
                   callback: Callable[[PyTree, np.ndarray], Any] | None = None,
                   checkpoint_dir: str | None = None, checkpoint_every: int = 100
                   ) -> tuple[PyTree, np.ndarray, list[int]]:
  """Run the parameter server of staleness-aware n-softsync SGD until every learner has
  closed (:func:`master_softsync` for each push, served as it arrives).

  Args:
    params0: the initial parameters (version 0).
    num_learners: lambda, the number of learner processes.
    n: the softsync degree: an update every c = lambda / n gradients (n divides lambda).
    alpha0: the base learning rate > 0.
    modulation: ``"inverse"`` (alpha0 / staleness) or ``"none"`` (plain ASGD).
    order, timeout_s, poll_s, check_s, callback, checkpoint_dir, checkpoint_every:
      as :func:`serve_easgd`.

  Returns:
    ``(params, served, gone)``: the server's final parameters, the pushes served per
    learner and the learners found dead.
  """
  if not isinstance(n, int) or not 1 <= n <= num_learners or num_learners % n:
    raise ValueError(f"`n` must be an integer dividing num_learners={num_learners}, got {n!r}.")
  if not alpha0 > 0:
    raise ValueError(f"`alpha0` must be > 0, got {alpha0!r}.")
  if modulation not in ("inverse", "none"):
    raise ValueError(f"unknown `modulation` {modulation!r}; choose 'inverse' or 'none'.")
  join_backend()
  theta = jax.tree_util.tree_map(lambda v: np.array(v), jax.device_get(params0))
  like = (f32_zeros(theta), np.int64(0))
  c = num_learners // n
  return serve(SOFTSYNC_PREFIX, (theta, (0, [])), like,
                lambda st, push: master_softsync(st, push, alpha0, c, modulation),
                num_learners, order, timeout_s, poll_s, check_s, callback,
                version=lambda st: st[1][0],
                checkpoint=checkpoint(checkpoint_dir, checkpoint_every),
                to_saved=lambda st: _softsync_saved(st, theta, c), from_saved=_softsync_state)
