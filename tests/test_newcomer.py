"""What a new user trips on, each checked the way the user met it: sampling the README's
way, constructor argument types, building the state, wagrad inside a chain, one
device, the extras that install the digits example."""
import inspect
import os
import re
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wagrad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ sampling


def test_runner_sample_draws_each_worker_its_own_batch_from_the_whole_set():
  runner = wagrad.Runner("shard_map", 8)
  X = np.arange(200, dtype=np.float32).reshape(100, 2)
  y = np.arange(100)
  xs, ys = runner.sample(X, y, batch_size=16, step=3, seed=1)
  assert xs.shape == (8, 16, 2) and ys.shape == (8, 16)
  np.testing.assert_array_equal(np.asarray(xs)[..., 0], 2 * np.asarray(ys))  # rows kept
  assert len({tuple(r) for r in np.asarray(ys)}) == 8  # a stream per worker
  again = runner.sample(X, y, batch_size=16, step=3, seed=1)[1]
  np.testing.assert_array_equal(np.asarray(again), np.asarray(ys))  # seeded
  assert not np.array_equal(np.asarray(runner.sample(X, y, batch_size=16, step=4, seed=1)[1]),
                            np.asarray(ys))
  # over steps every worker sees the whole set, not a shard of it
  seen = np.concatenate([np.asarray(runner.sample(y, batch_size=16, step=t))[0]
                         for t in range(40)])
  assert len(set(seen.tolist())) > 90
  with pytest.raises(ValueError, match="same number"):
    runner.sample(X, y[:50], batch_size=4, step=0)


def test_readme_first_loop_samples_and_names_the_shard_option():
  text = open(os.path.join(ROOT, "README.md")).read()
  first = text[text.index("## How to use it"):]
  loop = re.findall(r"```python\n(.*?)```", first, re.S)[0]
  assert "runner.sample(" in loop and "runner.shard(" not in loop
  assert "runner.shard(X, y)" in first and "over-fit" in first


def _breast_cancer():
  from sklearn.datasets import load_breast_cancer
  X, y = load_breast_cancer(return_X_y=True)
  idx = np.random.default_rng(0).permutation(len(X))
  X, y = X[idx], y[idx].astype(np.int32)
  n = int(0.6 * len(X))
  X = ((X - X[:n].mean(0)) / (X[:n].std(0) + 1e-8)).astype(np.float32)
  return (X[:n], y[:n]), (X[n:], y[n:])


@pytest.mark.slow
def test_lsgd_leader_trained_the_readme_way_is_as_good_as_averaging():
  """Real data (not digits): with every worker sampling the whole training set, the
  leader LSGD evaluates is within 2 points of model averaging's mean."""
  (Xtr, ytr), (Xte, yte) = _breast_cancer()
  K, H = 8, 32

  def logits(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params0 = {"w1": jax.random.normal(k1, (Xtr.shape[1], H)) / np.sqrt(Xtr.shape[1]),
             "b1": jnp.zeros(H), "w2": jax.random.normal(k2, (H, 2)) / np.sqrt(H),
             "b2": jnp.zeros(2)}
  accuracy = {}
  for name in ("model_averaging", "lsgd"):
    runner = wagrad.Runner("vmap", num_workers=K)
    tx = getattr(wagrad, name)(optax.sgd(0.1), 8, axis_name=runner.axis_name)

    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, value=loss)
      return wagrad.apply_updates(params, updates, opt_state), opt_state, loss

    step = runner.map(step, donate_argnums=(0, 1))
    params, opt_state = runner.replicate(params0), runner.init(tx, params0)
    for t in range(200):
      xs, ys = runner.sample(Xtr, ytr, batch_size=8, step=t)
      params, opt_state, _ = step(params, opt_state, xs, ys)
    model = wagrad.evaluated_params(params, opt_state)
    accuracy[name] = float((logits(model, Xte).argmax(-1) == yte).mean())
  assert accuracy["model_averaging"] > 0.9, accuracy
  assert accuracy["lsgd"] >= accuracy["model_averaging"] - 0.02, accuracy


# ------------------------------------------------------------------ constructor arguments

_TRANSFORMS = {  # name -> the arguments it needs besides the inner optimizer
    "sync_sgd": {}, "model_averaging": {}, "diloco": {}, "easgd": {}, "eamsgd": {},
    "lsgd": {}, "async_easgd": {}, "async_lsgd": {}, "staleness_aware_sgd": {},
    "wasgd": {}, "wasgd_plus": {}, "wpsgd": {},
    "tree_easgd": {"group_axis": "g", "global_axis": "G"},
    "multi_leader_lsgd": {"group_axis": "g", "global_axis": "G", "local_period": 2,
                          "global_period": 4},
}


def _numeric_parameters(fn):
  """Arguments whose default is a number (or None for an optional number): by the
  defaults and the docstring, independently of how the constructor checks them."""
  out = []
  for name, p in inspect.signature(fn).parameters.items():
    d = p.default
    if isinstance(d, (int, float)) and not isinstance(d, bool):
      out.append(name)
    elif d is None and re.search(r"\b(float|int|Period)\b", str(p.annotation)) and \
        "str" not in str(p.annotation):
      out.append(name)
  return out


def test_every_transform_in_the_registry_is_checked():
  assert set(_TRANSFORMS) == {
      n for n in dir(wagrad) if n in (
          "sync_sgd", "model_averaging", "diloco", "downpour", "easgd", "eamsgd",
          "tree_easgd", "multi_leader_lsgd", "lsgd", "async_easgd", "async_lsgd",
          "staleness_aware_sgd", "wasgd", "wasgd_plus", "wpsgd")} - {"downpour"}


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_a_transform_or_string_where_a_number_goes_is_a_type_error(name):
  fn = getattr(wagrad, name)
  params = _numeric_parameters(fn)
  assert params or name == "sync_sgd", name
  for arg in params:
    for wrong in (optax.sgd(0.1), "0.5", {"a": 1.0}):
      with pytest.raises(TypeError, match=rf"wagrad\.{name}: `{arg}` must be"):
        fn(optax.sgd(0.1), **{**_TRANSFORMS[name], arg: wrong})


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_a_number_where_the_inner_optimizer_goes_is_a_type_error(name):
  with pytest.raises(TypeError, match="inner optimizer\\s+first"):
    getattr(wagrad, name)(0.1, **_TRANSFORMS[name])


def test_a_call_that_does_not_bind_shows_the_call():
  with pytest.raises(TypeError, match=r"wagrad\.easgd: .*'rho'.*keyword arguments: alpha, beta"):
    wagrad.easgd(optax.sgd(0.1), 4, rho=0.1)
  with pytest.raises(TypeError, match=r"inner optimizer first.*wagrad\.diloco\(optax"):
    wagrad.diloco(4e-4, 0.7, 50)  # the old convention
  with pytest.raises(TypeError, match=r"missing a required argument: 'inner'"):
    wagrad.model_averaging(sync_period=4)


def test_diloco_takes_its_inner_optimizer_first_and_the_period_second():
  runner = wagrad.Runner("vmap", 4)
  tx = wagrad.diloco(optax.adamw(1e-3), 8, axis_name=runner.axis_name)
  p0 = {"w": jnp.ones(3)}

  def step(p, s, x):
    loss, g = jax.value_and_grad(lambda p: jnp.sum((p["w"] - x) ** 2))(p)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s

  f = runner.map(step)
  p, s = runner.replicate(p0), runner.init(tx, p0)
  for t in range(8):
    p, s = f(p, s, jnp.zeros((4, 3)))
    assert int(s.shared.num_exchanges) == (t == 7)  # exchanges after 8 steps, not every 1
  with pytest.raises(ValueError, match="would do nothing"):
    wagrad.diloco(optax.adamw(1e-3), 8, inner_learning_rate=1e-3)


# ------------------------------------------------------------------ building the state


def _misuse_setup():
  runner = wagrad.Runner("vmap", 8)
  tx = wagrad.model_averaging(optax.sgd(0.1, momentum=0.9), 4, axis_name=runner.axis_name)
  p0 = {"w": jnp.ones(3)}

  def step(p, s, x):
    loss, g = jax.value_and_grad(lambda p: jnp.sum((p["w"] - x) ** 2))(p)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s, loss

  return runner, tx, p0, runner.map(step)


def test_vmapped_or_single_tx_init_points_to_runner_init():
  runner, tx, p0, f = _misuse_setup()
  x = jnp.zeros((8, 3))
  for state in (jax.vmap(tx.init)(runner.replicate(p0)), tx.init(p0)):
    with pytest.raises(ValueError, match=r"runner\.init\(tx, params0\)"):
      f(runner.replicate(p0), state, x)
  with pytest.raises(ValueError, match=r"runner\.sample"):  # data: how to stack it
    f(runner.replicate(p0), runner.init(tx, p0), jnp.zeros(3))
  f(runner.replicate(p0), runner.init(tx, p0), x)  # the right way runs


# ------------------------------------------------------------------ wagrad inside a chain


def test_wagrad_followed_by_another_transform_in_a_chain_is_refused():
  runner, tx, p0, _ = _misuse_setup()
  chained = optax.chain(tx, optax.clip(1.0))
  with pytest.raises(ValueError, match="outermost"):
    runner.init(chained, p0)

  # a loop of one's own, without the runner: refused when the updates are applied
  state = jax.vmap(chained.init, in_axes=None, out_axes=None, axis_name=runner.axis_name,
                   axis_size=8)(p0)
  with pytest.raises(ValueError, match="outermost"):
    wagrad.apply_updates(p0, p0, state)
  # transforms before it only see gradients: allowed
  runner.init(optax.chain(optax.clip(1.0), tx), p0)


# ------------------------------------------------------------------ one device


def test_shard_map_runner_on_one_device_says_so_once(monkeypatch):
  real = jax.devices
  monkeypatch.setattr(jax, "devices", lambda *a: real(*a)[:1])
  with pytest.warns(UserWarning, match="one device.*xla_force_host_platform_device_count=8"):
    runner = wagrad.Runner("shard_map", 8)
  assert runner.num_devices == 1
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    wagrad.Runner("shard_map", 8, num_devices=1)  # asked for: no warning
    wagrad.Runner("vmap", 8)


# ------------------------------------------------------------------ install weight


def test_the_digits_example_has_a_light_extra_and_readme_uses_it():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  heavy = ("tensorflow-datasets", "orbax", "tensorstore", "pyarrow")
  assert not [d for d in extras["digits"] if d.startswith(heavy)], extras["digits"]
  assert any(d.startswith("tensorflow-datasets") for d in extras["cifar"])
  readme = open(os.path.join(ROOT, "README.md")).read()
  first = re.findall(r"```bash\n(.*?)```", readme, re.S)[0]
  assert first.strip() == "pip install -e '.[digits]' && python examples/cpu_digits.py"


# ------------------------------------------------------------------ one name for the flag


@pytest.mark.parametrize("name, old, kw", [
    ("lsgd", "exchange", {"value": 1.0}),
    ("async_lsgd", "any_report", {"value": 1.0, "active": True}),
    ("downpour", "any_push", {"active": True}),
])
def test_the_per_step_flag_has_one_name(name, old, kw):
  """``any_exchange=`` everywhere; an old name would reach the inner optimizer and do
  nothing, so it is refused by name."""
  runner = wagrad.Runner("vmap", 4)
  if name == "downpour":
    tx = wagrad.downpour(0.1, 2, asynchronous=True, axis_name=runner.axis_name)
  else:
    tx = getattr(wagrad, name)(optax.sgd(0.1), 2, axis_name=runner.axis_name)
  p0 = {"w": jnp.ones(3)}

  def step(p, s, flag):
    g = jax.tree_util.tree_map(jnp.ones_like, p)
    return tx.update(g, s, p, **kw, **{old: flag})[1]

  with pytest.raises(TypeError, match=f"`any_exchange=` now \\(was `{old}=`\\)"):
    runner.map(step)(runner.replicate(p0), runner.init(tx, p0), wagrad.Shared(True))


@pytest.mark.parametrize("call, where", [
    (lambda: wagrad.schedules.speed_schedule("4", 10), "wagrad.schedules.speed_schedule"),
    (lambda: wagrad.schedules.straggler_speeds(4, optax.sgd(0.1)),
     "wagrad.schedules.straggler_speeds"),
    (lambda: wagrad.schedules.softsync_schedule(4, "2", 10),
     "wagrad.schedules.softsync_schedule"),
    (lambda: wagrad.schedules.uneven_round_steps(np.ones((4, 4), bool), "2"),
     "wagrad.schedules.uneven_round_steps"),
])
def test_schedules_check_their_argument_types(call, where):
  with pytest.raises(TypeError, match=rf"{re.escape(where)}: `\w+` must be a number"):
    call()


def test_async_servers_check_their_argument_types():
  from wagrad import async_
  with pytest.raises(TypeError, match=r"wagrad\.async_\.serve_easgd: `alpha` must be a number"):
    async_.serve_easgd({"w": np.zeros(2)}, 2, alpha="0.5")
