"""Asynchronous training across processes: every worker a JAX process of its own,
stepping at its own pace, exchanging with a master process through JAX's runtime (no
lockstep). The simulated versions (``wagrad.async_easgd``, ...) run the same rules
inside one SPMD program; these run them for real.

* asynchronous EASGD: :class:`EASGDWorker` in worker processes, :func:`serve_easgd` in
  process 0 (the master keeping the center);
* asynchronous DOWNPOUR: :class:`DownpourWorker` in worker processes,
  :func:`serve_downpour` in process 0 (the parameter server);
* staleness-aware n-softsync SGD: :class:`SoftsyncLearner` in learner processes,
  :func:`serve_softsync` in process 0 (the parameter server).
"""

from wagrad._src.async_processes import (DownpourWorker, EASGDWorker, SoftsyncLearner,
                                         master_exchange, master_push, master_softsync,
                                         serve_downpour, serve_easgd, serve_softsync)

__all__ = ["DownpourWorker", "EASGDWorker", "SoftsyncLearner", "master_exchange",
           "master_push", "master_softsync", "serve_downpour", "serve_easgd",
           "serve_softsync"]
