"""wagrad: parallel-SGD algorithms as optax transforms over a named JAX worker axis.

The top level holds what a training loop uses: the transforms, how to apply their
updates and read the model each paper evaluates, the runner that maps a step over
workers, the simulation schedules, the collectives for a loop of your own, and the
Flax, checkpoint and multi-host helpers. State classes and internals stay importable
from their modules (``wagrad._src.<module>``).
"""

# Transforms (optax-style, each wrapping an inner optimizer), by family.
from wagrad._src.baselines import diloco, downpour, model_averaging, sync_sgd
from wagrad._src.easgd import eamsgd, easgd
from wagrad._src.hierarchical import multi_leader_lsgd, tree_easgd
from wagrad._src.lsgd import lsgd
from wagrad._src.simulated_async import async_easgd, async_lsgd
from wagrad._src.staleness import staleness_aware_sgd
from wagrad._src.weighted import wasgd, wasgd_plus, wpsgd

# Applying updates; the model each paper evaluates.
from wagrad._src.base import apply_updates
from wagrad._src.baselines import one_shot_average
from wagrad._src.easgd import eamsgd_lookahead, easgd_center
from wagrad._src.evaluate import evaluated_params
from wagrad._src.weighted import wpsgd_combine

# Running workers: the runner, shared (unstacked) state.
from wagrad._src.base import Shared, find_shared, is_shared, shared_state
from wagrad._src.parallel import Runner, stack_workers, unstack_worker

# Simulation schedules (seeded NumPy tables: speeds, drops, arrivals).
from wagrad._src.hierarchical import uneven_round_steps
from wagrad._src.schedules import drop_workers, speed_schedule, straggler_speeds
from wagrad._src.simulated_async import async_easgd_schedule, async_report_steps
from wagrad._src.staleness import softsync_schedule
from wagrad._src.weighted import wasgd_plus_sample_order

# Collectives for a loop of your own (inside a function mapped over the worker axis).
from wagrad._src.collectives import (broadcast_from, consensus_distance, elastic_step,
                                     elect_leader, weighted_mean)
from wagrad._src.weighted import loss_weights

# Flax model state, checkpoints, several hosts.
from wagrad._src.checkpoint import restore_checkpoint, save_checkpoint
from wagrad._src.distributed import initialize as initialize_distributed
from wagrad._src.flax_utils import nnx_update, reestimate_batch_stats, sync_model_state

__version__ = "0.2.0.dev0"
