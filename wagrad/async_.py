"""Asynchronous training across processes: every worker a JAX process of its own,
stepping at its own pace, exchanging with a master process through JAX's runtime (no
lockstep). The simulated versions (``wagrad.async_easgd``, ...) run the same rules
inside one SPMD program; these run them for real.

* asynchronous EASGD: :class:`EASGDWorker` in worker processes, :func:`serve_easgd` in
  process 0 (the master keeping the center);
* asynchronous DOWNPOUR: :class:`DownpourWorker` in worker processes,
  :func:`serve_downpour` in process 0 (the parameter server);
* staleness-aware n-softsync SGD: :class:`SoftsyncLearner` in learner processes,
  :func:`serve_softsync` in process 0 (the parameter server);
* asynchronous LSGD: :class:`LSGDWorker` in worker processes, :func:`serve_lsgd` in
  process 0 (the master keeping the best leader reported);
* WP-SGD on unequal workloads: :class:`WPSGDWorker` in worker processes (each at its
  own speed, for a wall-clock budget), :func:`serve_wpsgd` in process 0 (the
  weighted combination).

The masters' rules themselves (``master_exchange``, ``master_push``,
``master_softsync``, ``master_lsgd``, ``master_wpsgd``) are internals:
``wagrad._src.async_processes``, ``wagrad._src.async_softsync`` and
``wagrad._src.async_ranked``.
"""

from wagrad._src.async_processes import (DownpourWorker, EASGDWorker, serve_downpour,
                                         serve_easgd)
from wagrad._src.async_ranked import LSGDWorker, WPSGDWorker, serve_lsgd, serve_wpsgd
from wagrad._src.async_softsync import SoftsyncLearner, serve_softsync

__all__ = ["DownpourWorker", "EASGDWorker", "LSGDWorker", "SoftsyncLearner", "WPSGDWorker",
           "serve_downpour", "serve_easgd", "serve_lsgd", "serve_softsync", "serve_wpsgd"]
