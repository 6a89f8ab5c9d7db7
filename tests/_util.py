"""Shared helpers of the test suite (problems, backends, NumPy references)."""
import numpy as np
import jax
import jax.numpy as jnp

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
