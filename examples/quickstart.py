"""wagrad in one page: 8 simulated workers train an MLP on scikit-learn's digits with
elastic averaging SGD (EASGD), then the center, the model the paper evaluates, is tested.

    pip install -e '.[digits]' && python examples/quickstart.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import wagrad

X, y = load_digits(return_X_y=True)
X, y = (X / 16.0).astype(np.float32), y.astype(np.int32)
order = np.random.default_rng(0).permutation(len(X))
(X_train, y_train), (X_test, y_test) = ((X[order[:1400]], y[order[:1400]]),
                                        (X[order[1400:]], y[order[1400:]]))


def init(key, sizes=(64, 128, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def logits(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


runner = wagrad.Runner("vmap", num_workers=8)             # or "shard_map", "pmap"
tx = wagrad.easgd(optax.sgd(0.1), sync_period=4, axis_name=runner.axis_name)


def step(params, opt_state, x, y):                        # one worker's step
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, opt_state = tx.update(grads, opt_state, params, value=loss)
  return wagrad.apply_updates(params, updates, opt_state), opt_state, loss


step = runner.map(step, donate_argnums=(0, 1))
params0 = init(jax.random.PRNGKey(0))
params, opt_state = runner.replicate(params0), runner.init(tx, params0)
for t in range(300):
  xs, ys = runner.sample(X_train, y_train, batch_size=16, step=t)
  params, opt_state, loss = step(params, opt_state, xs, ys)
  if t % 100 == 0:
    print(f"step {t:3d}  mean worker loss {float(loss.mean()):.3f}")

model = wagrad.evaluated_params(params, opt_state)        # EASGD's center
accuracy = float((logits(model, X_test).argmax(-1) == y_test).mean())
print(f"test accuracy of the center: {accuracy:.3f}")
