"""Collectives for a training loop of your own: plain functions over the worker axis,
called inside a function mapped over it (``runner.map``, ``jax.vmap(axis_name=...)``,
``jax.shard_map``). The transforms are made of them.

A worker whose loss or parameters are non-finite gets weight 0 and is never elected
leader; when every worker is non-finite the result says so (``ok=False``) instead of
returning NaN (design.md, The guard against non-finite workers).
"""

from wagrad._src.collectives import (broadcast_from, consensus_distance, elastic_step,
                                     elect_leader, weighted_mean)
from wagrad._src.worker_weights import loss_weights

__all__ = ["broadcast_from", "consensus_distance", "elastic_step", "elect_leader",
           "loss_weights", "weighted_mean"]
