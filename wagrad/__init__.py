"""wagrad: parallel-SGD algorithms as optax transforms over a named JAX worker axis."""

from wagrad._src.base import (
    Shared,
    apply_updates,
    find_shared,
    is_shared,
    shared_state,
    worker_axes,
)
from wagrad._src.collectives import (
    Leader,
    Weighted,
    all_equal,
    all_gather,
    axis_size,
    broadcast_from,
    consensus_distance,
    elastic_step,
    elect_leader,
    normalize_weights,
    pmean_tree,
    psum_tree,
    softmax_weights,
    tree_is_finite,
    weighted_mean,
    worker_index,
)
from wagrad._src.parallel import BACKENDS, Runner, stack_workers, unstack_worker
from wagrad._src.baselines import (
    AveragingShared,
    ModelAveragingState,
    SyncSGDState,
    diloco,
    model_averaging,
    one_shot_average,
    sync_sgd,
)
from wagrad._src.easgd import (
    AsyncEASGDShared,
    AsyncEASGDState,
    DownpourShared,
    DownpourState,
    EAMSGDShared,
    EAMSGDState,
    EASGDShared,
    EASGDState,
    TreeEASGDShared,
    TreeEASGDState,
    async_easgd,
    async_easgd_schedule,
    downpour,
    eamsgd,
    eamsgd_lookahead,
    easgd,
    easgd_center,
    tree_easgd,
)
from wagrad._src.lsgd import (
    AsyncLSGDShared,
    AsyncLSGDState,
    LSGDShared,
    LSGDState,
    MultiLeaderShared,
    MultiLeaderState,
    async_lsgd,
    async_report_steps,
    lsgd,
    multi_leader_lsgd,
    uneven_round_steps,
)
from wagrad._src.weighted import (
    WASGDShared,
    WASGDState,
    WPSGDShared,
    WPSGDState,
    loss_weights,
    wasgd,
    wasgd_plus,
    wasgd_plus_sample_order,
    wpsgd,
    wpsgd_combine,
)
from wagrad._src.staleness import (
    SoftsyncSchedule,
    StalenessShared,
    StalenessState,
    softsync_schedule,
    staleness_apply,
    staleness_aware_sgd,
)
from wagrad._src.schedules import (
    drop_workers,
    local_step_counts,
    speed_schedule,
    straggler_speeds,
)
from wagrad._src.checkpoint import restore_checkpoint, save_checkpoint
from wagrad._src.distributed import initialize as initialize_distributed
from wagrad._src.flax_utils import nnx_update, reestimate_batch_stats, sync_model_state

__version__ = "0.1.0"
