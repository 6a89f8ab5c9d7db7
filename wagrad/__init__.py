"""wagrad: parallel-SGD algorithms as optax transforms over a named JAX worker axis.

The top level holds what a training loop uses: the transforms, how to apply their
updates and read the model each paper evaluates, the runner that maps a step over
workers, the simulation schedules, the collectives for a loop of your own, and the
Flax, checkpoint and multi-host helpers. State classes and internals stay importable
from their modules (``wagrad._src.<module>``).
"""

# Transforms (optax-style, each wrapping an inner optimizer), by family.
from wagrad._src.baselines import diloco, model_averaging, sync_sgd
from wagrad._src.downpour import downpour
from wagrad._src.easgd import eamsgd, easgd
from wagrad._src.hierarchical import tree_easgd
from wagrad._src.multi_leader import multi_leader_lsgd
from wagrad._src.lsgd import lsgd
from wagrad._src.simulated_async import async_easgd, async_lsgd
from wagrad._src.staleness import staleness_aware_sgd
from wagrad._src.weighted import wasgd, wasgd_plus
from wagrad._src.wpsgd import wpsgd

# Applying updates; the model each paper evaluates.
from wagrad._src.base import apply_updates
from wagrad._src.baselines import one_shot_average
from wagrad._src.easgd import eamsgd_lookahead, easgd_center
from wagrad._src.evaluate import evaluated_params
from wagrad._src.wpsgd import wpsgd_combine

# Running workers: the runner, shared (unstacked) state.
from wagrad._src.base import Shared, shared_state
from wagrad._src.parallel import Runner
from wagrad._src.placement import stack_workers, unstack_worker

# Simulation schedules (seeded NumPy tables) and collectives for a loop of your own.
from wagrad import collectives, schedules

# Flax model state, checkpoints, several hosts.
from wagrad._src.checkpoint import restore_checkpoint, save_checkpoint
from wagrad._src.distributed import initialize as initialize_distributed
from wagrad._src.flax_utils import nnx_update, reestimate_batch_stats, sync_model_state

__version__ = "0.2.0.dev0"

# Names that moved into a namespace: still found here, with a warning naming the new place.
_MOVED = {**{n: "schedules" for n in schedules.__all__},
          **{n: "collectives" for n in collectives.__all__},
          "find_shared": "_src.base", "is_shared": "_src.base"}


def __getattr__(name):
  where = _MOVED.get(name)
  if where is None:
    raise AttributeError(f"module 'wagrad' has no attribute {name!r}")
  import importlib
  import warnings
  warnings.warn(f"wagrad.{name} is now wagrad.{where}.{name}.", DeprecationWarning,
                stacklevel=2)
  return getattr(importlib.import_module(f"wagrad.{where}"), name)
