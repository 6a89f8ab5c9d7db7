"""Flax integration: linen TrainState-style loop with BatchNorm and model-state sync,
nnx.Optimizer with value=, BatchNorm re-estimation."""
import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import nnx

import wagrad
from _util import ALL_K as _K, ALL_STEPS as _T, ALL_TRANSFORMS as NNX_TRANSFORMS, BACKENDS, BACKEND_IDS


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(1)(nn.relu(x))[..., 0]


def _linen_run(backend, K, steps=6, tau=3):
  model = BNNet()
  rng = np.random.default_rng(0)
  X = rng.normal(size=(K, 16, 4)).astype(np.float32)
  Y = rng.normal(size=(K, 16)).astype(np.float32)
  v0 = model.init(jax.random.key(0), X[0], train=False)
  r = wagrad.Runner(backend, K)
  tx = wagrad.model_averaging(optax.sgd(0.05), tau, axis_name=r.axis_name)

  def step(params, stats, s, x, y):
    def loss_fn(p):
      out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.mean((out - y) ** 2), upd["batch_stats"]
    (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, s = tx.update(g, s, params, value=loss)
    new_stats = wagrad.sync_model_state(new_stats, s, r.axis_name)
    return wagrad.apply_updates(params, u, s), new_stats, s, wagrad.Shared(s.shared.assign)

  f = r.map(step)
  p, st, s = r.replicate(v0["params"]), r.replicate(v0["batch_stats"]), r.init(tx, v0["params"])
  hist = []
  for _ in range(steps):
    p, st, s, a = f(p, st, s, X, Y)
    hist.append((jax.device_get(st), bool(a.value)))
  return hist


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_linen_batchnorm_stats_averaged_at_exchanges(backend, K):
  hist = _linen_run(backend, K)
  for t, (st, exchanged) in enumerate(hist):
    leaves = jax.tree_util.tree_leaves(st)
    equal = all(bool((l == l[0]).all()) for l in leaves)
    assert exchanged == ((t + 1) % 3 == 0)
    assert equal == exchanged, t  # equal right after an exchange, differ in between
  # the synced value is the mean of the workers' stats (checked against the step before)
  ref = _linen_run("vmap", K, steps=3)
  assert all(np.allclose(a, b, rtol=1e-5) for a, b in zip(
      jax.tree_util.tree_leaves(ref[-1][0]), jax.tree_util.tree_leaves(hist[2][0])))


@pytest.mark.parametrize("exact", [True, False])
def test_sync_model_state_is_mean(exact):
  K = 8
  r = wagrad.Runner("vmap", K)
  tx = wagrad.model_averaging(optax.sgd(0.1), 2, axis_name=r.axis_name, exact=exact)
  stats = np.arange(K * 3, dtype=np.float32).reshape(K, 3)

  def fn(p, s, stats):
    u, s = tx.update(p, s, p)
    return s, wagrad.sync_model_state(stats, s, r.axis_name)
  f = r.map(fn)
  p = np.zeros((K, 2), np.float32)
  s, out = f(p, r.init(tx, jnp.zeros(2)), stats)   # step 1: no exchange
  np.testing.assert_array_equal(jax.device_get(out), stats)
  s, out = f(p, s, stats)                              # step 2: exchange
  out = jax.device_get(out)
  np.testing.assert_allclose(out, np.broadcast_to(stats.mean(0), out.shape), rtol=1e-6)


@pytest.mark.parametrize("name", ["async_lsgd", "async_easgd"])
def test_sync_model_state_leaves_async_transforms_local(name):
  """Per-worker (asynchronous) exchanges have no shared exchange step for the model
  state to follow: sync_model_state returns it unchanged, also on steps where workers
  exchanged (as documented)."""
  K = 8
  r = wagrad.Runner("vmap", K)
  make = wagrad.async_lsgd if name == "async_lsgd" else wagrad.async_easgd
  tx = make(optax.sgd(0.1), 2, axis_name=r.axis_name)
  stats = np.arange(K * 3, dtype=np.float32).reshape(K, 3)

  def fn(p, s, stats):
    u, s = tx.update(p, s, p, value=jnp.sum(p ** 2), active=True)
    return optax.apply_updates(p, u), s, wagrad.sync_model_state(stats, s, r.axis_name)
  f = r.map(fn)
  p = np.arange(K * 2, dtype=np.float32).reshape(K, 2)
  s = r.init(tx, jnp.zeros(2))
  for _ in range(4):
    p, s, out = f(p, s, stats)
    np.testing.assert_array_equal(jax.device_get(out), stats)
  p = jax.device_get(p)
  assert not np.allclose(p, p[:1])  # the workers stayed apart ...
  assert int(wagrad_shared(s).num_exchanges) > 0  # ... though they exchanged


def wagrad_shared(state):
  from wagrad._src import base
  return base.find_shared(jax.device_get(state), "count")


def test_nnx_optimizer_with_value():
  """nnx.Optimizer forwards value=; nnx_update takes the average exactly."""
  K, tau = 8, 2
  r = wagrad.Runner("vmap", K)
  rng = np.random.default_rng(0)
  X = rng.normal(size=(K, 8, 3)).astype(np.float32)
  Y = rng.normal(size=(K, 8)).astype(np.float32)
  tx = wagrad.model_averaging(optax.sgd(0.1), tau, axis_name=r.axis_name)
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))

  def step(state, x, y):
    model, opt = nnx.merge(graphdef, state)
    def loss_fn(m):
      return jnp.mean((m(x)[:, 0] - y) ** 2)
    loss, g = nnx.value_and_grad(loss_fn)(model)
    wagrad.nnx_update(opt, model, g, value=loss)
    return nnx.state((model, opt)), loss

  f = r.map(step)
  st = r.replicate(state)
  kernels = []
  for _ in range(4):
    st, loss = f(st, X, Y)
    kernels.append(np.asarray(st[0]["kernel"].get_value()))
  assert not (kernels[0] == kernels[0][0]).all()  # after a local step: differ
  assert (kernels[1] == kernels[1][0]).all()  # after the exchange: identical, exactly
  assert (kernels[3] == kernels[3][0]).all()
  # same trajectory as the plain functional loop
  p0 = {"w": jnp.asarray(nnx.state(model, nnx.Param)["kernel"].get_value()),
        "b": jnp.asarray(nnx.state(model, nnx.Param)["bias"].get_value())}

  def step2(p, s, x, y):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(((x @ p["w"] + p["b"])[:, 0] - y) ** 2))(p)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s, loss
  f2 = r.map(step2)
  p, s = r.replicate(p0), r.init(tx, p0)
  for _ in range(4):
    p, s, _ = f2(p, s, X, Y)
  np.testing.assert_allclose(np.asarray(p["w"]), kernels[3], rtol=1e-5, atol=1e-6)


def test_reestimate_batch_stats_exact():
  model = BNNet()
  X = np.random.default_rng(0).normal(size=(3, 32, 4)).astype(np.float32)
  v = model.init(jax.random.key(0), X[0], train=False)
  apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  est = wagrad.reestimate_batch_stats(apply, v, list(X))
  h = [np.asarray(X[i] @ v["params"]["Dense_0"]["kernel"] + v["params"]["Dense_0"]["bias"])
       for i in range(3)]
  mean_ref = np.mean([hi.mean(0) for hi in h], axis=0)
  var_ref = np.mean([hi.var(0) for hi in h], axis=0)
  np.testing.assert_allclose(est["BatchNorm_0"]["mean"], mean_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(est["BatchNorm_0"]["var"], var_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,K", BACKENDS[:2], ids=BACKEND_IDS[:2])
def test_linen_batchnorm_stats_follow_lsgd_rule(backend, K):
  """LSGD: at an exchange the BatchNorm statistics are pulled toward the leader's with
  the pull strength, like the parameters: s <- (1 - c) s + c s_leader."""
  model = BNNet()
  rng = np.random.default_rng(1)
  X = rng.normal(size=(K, 16, 4)).astype(np.float32)
  Y = rng.normal(size=(K, 16)).astype(np.float32)
  v0 = model.init(jax.random.key(0), X[0], train=False)
  r = wagrad.Runner(backend, K)
  c, tau = 0.3, 2
  tx = wagrad.lsgd(optax.sgd(0.05), tau, pull=c, axis_name=r.axis_name)

  def step(params, stats, s, x, y):
    def loss_fn(p):
      out, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.mean((out - y) ** 2), upd["batch_stats"]
    (loss, fresh), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, s = tx.update(g, s, params, value=loss)
    synced = wagrad.sync_model_state(fresh, s, r.axis_name, rate=c)
    return wagrad.apply_updates(params, u, s), synced, s, fresh

  f = r.map(step)
  p, st, s = r.replicate(v0["params"]), r.replicate(v0["batch_stats"]), r.init(tx, v0["params"])
  for t in range(tau):
    p, st, s, fresh = f(p, st, s, X, Y)
  assert bool(s.shared.exchanged)
  lead = int(s.shared.leader)
  for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(fresh)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, (1 - c) * b + c * b[lead], rtol=1e-5, atol=1e-6)


def test_nnx_transforms_cover_the_public_transforms():
  public = {n for n in dir(wagrad) if callable(getattr(wagrad, n)) and n in {
      "sync_sgd", "model_averaging", "diloco", "downpour", "easgd", "eamsgd", "async_easgd",
      "tree_easgd", "lsgd", "async_lsgd", "multi_leader_lsgd", "wasgd", "wasgd_plus",
      "wpsgd", "staleness_aware_sgd"}}
  assert public <= set(NNX_TRANSFORMS) and len(public) == 15  # and option variants


@pytest.mark.parametrize("name", list(NNX_TRANSFORMS))
def test_nnx_optimizer_runs_every_transform_as_the_functional_loop(name):
  """flax's own nnx.Optimizer (state split and stacked by the runner) with each
  transform, through wagrad.nnx_update, gives the functional loop's parameters
  (issue 20: easgd and lsgd crashed; the others were untested)."""
  make, kwargs, groups = NNX_TRANSFORMS[name]
  kwargs = kwargs or (lambda t: {})
  r = wagrad.Runner("vmap", _K, groups=groups)
  rng = np.random.default_rng(0)
  X = rng.normal(size=(_K, 8, 3)).astype(np.float32)
  Y = rng.normal(size=(_K, 8)).astype(np.float32)
  tx = make(r)
  look = name == "eamsgd"  # the gradient at EAMSGD's look-ahead point
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  p0 = {"w": jnp.asarray(model.kernel.get_value()), "b": jnp.asarray(model.bias.get_value())}
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  loss_of = lambda w, b, x, y: jnp.mean(((x @ w + b)[:, 0] - y) ** 2)  # noqa: E731

  def step(state, x, y, kw):
    model, opt = nnx.merge(graphdef, state)
    if look:
      at = wagrad.eamsgd_lookahead(nnx.state(model, nnx.Param), opt.opt_state)
      loss = loss_of(at["kernel"], at["bias"], x, y)
      gw, gb = jax.grad(loss_of, (0, 1))(at["kernel"], at["bias"], x, y)
      g = nnx.state(model, nnx.Param)
      nnx.replace_by_pure_dict(g, {"kernel": gw, "bias": gb})
    else:
      loss, g = nnx.value_and_grad(lambda m: loss_of(m.kernel[...], m.bias[...], x, y))(model)
    wagrad.nnx_update(opt, model, g, value=loss, **kw)
    return nnx.state((model, opt))

  def step2(p, s, x, y, kw):
    at = wagrad.eamsgd_lookahead(p, s) if look else p
    loss, g = jax.value_and_grad(lambda q: loss_of(q["w"], q["b"], x, y))(at)
    u, s = tx.update(g, s, p, value=loss, **kw)
    return wagrad.apply_updates(p, u, s), s

  f, f2 = r.map(step), r.map(step2)
  st, p, s = r.replicate(state), r.replicate(p0), r.init(tx, p0)
  for t in range(_T):
    st = f(st, X, Y, kwargs(t))
    p, s = f2(p, s, X, Y, kwargs(t))
  kernel = np.asarray(st[0]["kernel"].get_value())
  np.testing.assert_allclose(kernel, np.asarray(p["w"]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(kernel, kernel[0]) or name == "sync_sgd"  # workers differ
