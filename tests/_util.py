"""Shared helpers of the test suite (problems, backends, NumPy references)."""
import numpy as np
import jax
import jax.numpy as jnp
import optax

import wagrad

# (backend, num_workers): every algorithm is checked on all of them; the last one has
# K=16 workers on 8 devices (2 vmapped workers per device).
BACKENDS = [("vmap", 8), ("shard_map", 8), ("pmap", 8), ("shard_map", 16)]
BACKEND_IDS = [f"{b}-K{k}" for b, k in BACKENDS]


def least_squares(K, n=6, d=3, seed=0):
  """Per-worker least-squares data A_i (n x d), b_i (n): loss_i(w) = mean((A_i w - b_i)^2)."""
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(K, n, d)).astype(np.float32)
  b = rng.normal(size=(K, n)).astype(np.float32)
  return A, b


def ls_loss(params, A, b):
  return jnp.mean((A @ params["w"] - b) ** 2)


def ls_grad_np(w, A, b):
  """NumPy gradient of mean((A w - b)^2) for one worker (float64)."""
  r = A.astype(np.float64) @ w - b
  return 2.0 * A.T.astype(np.float64) @ r / A.shape[0]


def ls_loss_np(w, A, b):
  r = A.astype(np.float64) @ w - b
  return float(np.mean(r ** 2))


def run(runner, step, state, *data, steps):
  """Run ``steps`` steps of a mapped step(state..., *data) -> (state..., aux)."""
  f = runner.map(step)
  auxs = []
  for _ in range(steps):
    out = f(*state, *data)
    state, aux = out[:-1], out[-1]
    auxs.append(jax.device_get(aux))
  return state, auxs


def digits(seed=0):
  """scikit-learn's digits (1797 8x8 images, shipped with the package): train/test split."""
  from sklearn.datasets import load_digits
  X, y = load_digits(return_X_y=True)
  X = (X / 16.0).astype(np.float32)
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(X))
  X, y = X[idx], y[idx].astype(np.int32)
  return (X[:1400], y[:1400]), (X[1400:], y[1400:])


# Every public transform with small settings (K = 4 workers, tau = 2) for tests that run
# them all: ALL_STEPS steps (odd: the last step is a local one, where workers differ).
ALL_STEPS, ALL_K = 7, 4
_ACTIVE = wagrad.schedules.speed_schedule(ALL_K, 16, wagrad.schedules.straggler_speeds(ALL_K, 0.5, 2.0), seed=0)
_ANYX = wagrad.schedules.async_easgd_schedule(_ACTIVE, 2)[1]
_SOFT = wagrad.schedules.softsync_schedule(ALL_K, 2, 16, arrival="random", seed=0)
_act = lambda t: {"active": _ACTIVE[t]}  # noqa: E731

# name -> (transform of the runner, per-step arguments of step t, runner groups)
ALL_TRANSFORMS = {
    "sync_sgd": (lambda r: wagrad.sync_sgd(optax.sgd(0.1), axis_name=r.axis_name), None, None),
    "model_averaging": (lambda r: wagrad.model_averaging(
        optax.sgd(0.1), 2, warmup_steps=2, axis_name=r.axis_name), None, None),
    "diloco": (lambda r: wagrad.diloco(optax.adamw(0.01, weight_decay=0.1), 2,
                                       axis_name=r.axis_name), None, None),
    "diloco_int8": (lambda r: wagrad.diloco(optax.adamw(0.01, weight_decay=0.1), 2,
                                            compression="int8", axis_name=r.axis_name),
                    None, None),
    "downpour": (lambda r: wagrad.downpour(0.1, 2, axis_name=r.axis_name), None, None),
    "easgd": (lambda r: wagrad.easgd(optax.sgd(0.1), 2, axis_name=r.axis_name), None, None),
    "easgd_bf16": (lambda r: wagrad.easgd(optax.sgd(0.1), 2, compression="bfloat16",
                                          axis_name=r.axis_name), None, None),
    "eamsgd": (lambda r: wagrad.eamsgd(optax.sgd(0.05), 2, momentum=0.5,
                                       axis_name=r.axis_name), None, None),
    "async_easgd": (lambda r: wagrad.async_easgd(optax.sgd(0.1), 2, axis_name=r.axis_name),
                    lambda t: {"active": _ACTIVE[t], "any_exchange": wagrad.Shared(_ANYX[t])},
                    None),
    "tree_easgd": (lambda r: wagrad.tree_easgd(optax.sgd(0.1), group_axis=r.group_axis,
                                               global_axis=r.global_axis, sync_period=(1, 2)),
                   None, 2),
    "lsgd": (lambda r: wagrad.lsgd(optax.sgd(0.1), 2, axis_name=r.axis_name), None, None),
    "async_lsgd": (lambda r: wagrad.async_lsgd(optax.sgd(0.1), 2, axis_name=r.axis_name),
                   _act, None),
    "multi_leader_lsgd": (lambda r: wagrad.multi_leader_lsgd(
        optax.sgd(0.1), group_axis=r.group_axis, global_axis=r.global_axis,
        local_period=2, global_period=4), None, 2),
    "wasgd": (lambda r: wagrad.wasgd(optax.sgd(0.1), 2, axis_name=r.axis_name), None, None),
    "wasgd_plus": (lambda r: wagrad.wasgd_plus(optax.sgd(0.1), 2, loss_source="exchange_batch",
                                               axis_name=r.axis_name), None, None),
    "wpsgd": (lambda r: wagrad.wpsgd(optax.sgd(0.1), 2, weighting="samples",
                                     axis_name=r.axis_name), _act, None),
    "staleness_aware_sgd": (lambda r: wagrad.staleness_aware_sgd(
        optax.sgd(0.1), axis_name=r.axis_name),
        lambda t: dict(zip(("push", "staleness", "apply"), _SOFT.row(t))), None),
}


