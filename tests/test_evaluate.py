"""wagrad.evaluated_params: the model each paper evaluates, outside the mapped step,
against the in-map helpers (one_shot_average, easgd_center, the leader's broadcast,
wpsgd_combine, the server) on the same state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wagrad
from wagrad._src import collectives as C

K = 4
TARGETS = np.arange(K * 3, dtype=np.float32).reshape(K, 3) / 4.0


def _loss(p, c):
  return jnp.sum((p["w"] - c) ** 2)


def _mean(p, s, ax):
  return wagrad.one_shot_average(p, ax).value


def _leader(p, s, ax):
  return wagrad.collectives.broadcast_from(p, jnp.maximum(s.shared.leader, 0), ax)


def _wasgd(p, s, ax):
  return wagrad.collectives.weighted_mean(p, s.shared.weights[C.worker_index(ax)], ax).value


CASES = {
    "averaging": (lambda ax: wagrad.model_averaging(optax.sgd(0.1), 4, axis_name=ax), _mean),
    "diloco": (lambda ax: wagrad.diloco(optax.adamw(0.05, weight_decay=0.1), 2, axis_name=ax),
               lambda p, s, ax: s.shared.target),
    "easgd": (lambda ax: wagrad.easgd(optax.sgd(0.1), 2, axis_name=ax),
              lambda p, s, ax: wagrad.easgd_center(s)),
    "downpour": (lambda ax: wagrad.downpour(0.1, 2, axis_name=ax),
                 lambda p, s, ax: wagrad.easgd_center(s)),
    "lsgd": (lambda ax: wagrad.lsgd(optax.sgd(0.1), 2, axis_name=ax), _leader),
    "wasgd": (lambda ax: wagrad.wasgd(optax.sgd(0.1), 2, axis_name=ax, num_workers=K), _wasgd),
    "wpsgd": (lambda ax: wagrad.wpsgd(optax.sgd(0.1), weighting="samples", axis_name=ax),
              lambda p, s, ax: wagrad.wpsgd_combine(p, s, ax).value),
}


@pytest.mark.parametrize("name", list(CASES))
def test_evaluated_params_match_the_in_map_helpers(name):
  make, reference = CASES[name]
  r = wagrad.Runner("vmap", K)
  tx = make(r.axis_name)
  active = np.array([True, True, False, True])

  def step(p, s, c, a):
    loss, g = jax.value_and_grad(_loss)(p, c)
    extra = {"active": a} if name == "wpsgd" else {}
    u, s = tx.update(g, s, p, value=loss, **extra)
    p = wagrad.apply_updates(p, u, s)
    return p, s, reference(p, s, r.axis_name)

  f = r.map(step)
  p0 = {"w": np.zeros(3, np.float32)}
  p, s = r.replicate(p0), r.init(tx, p0)
  for t in range(5):  # ends one step after an exchange: workers differ
    p, s, ref = f(p, s, TARGETS, np.roll(active, t))
  got = wagrad.evaluated_params(p, s)
  want = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], ref)   # same on every worker
  np.testing.assert_allclose(np.asarray(got["w"]), want["w"], rtol=1e-5, atol=1e-6)
  assert np.asarray(got["w"]).shape == (3,)
  assert not np.allclose(np.asarray(p["w"])[0], np.asarray(p["w"])[1])  # a real test


def test_evaluated_params_rejects_a_state_without_wagrad():
  with pytest.raises(TypeError, match="no wagrad"):
    wagrad.evaluated_params({"w": np.zeros((2, 3))}, optax.sgd(0.1).init({"w": np.zeros(3)}))


@pytest.mark.parametrize("params", [0, {"w": np.zeros(3), "b": np.float32(0)},
                                    {"w": np.zeros((2, 3)), "b": np.zeros((3,))}])
def test_evaluated_params_names_what_to_pass_for_unstacked_params(params):
  """Not the workers' stacked parameters (an ``nnx.State`` unpacked into its keys, an
  unstacked leaf, leaves of different worker counts): a TypeError naming the fix, not an
  AttributeError from inside."""
  tx = wagrad.model_averaging(optax.sgd(0.1), 2)
  with pytest.raises(TypeError, match=r"stacked along a leading worker dimension.*nnx\.merge"):
    wagrad.evaluated_params(params, tx.init({"w": np.zeros(3)}))


def test_easgd_center_names_what_to_pass():
  with pytest.raises(TypeError, match=r"no EASGD-family state.*optimizer\.opt_state"):
    wagrad.easgd_center(wagrad.model_averaging(optax.sgd(0.1), 2).init({"w": np.zeros(3)}))


@pytest.mark.parametrize("name", ["easgd", "lsgd", "wasgd"])
def test_evaluated_params_reads_a_flax_nnx_state(name):
  """With nnx.Optimizer the runner stacks the whole state (shared leaves too) and the
  leaves are nnx variables: the accessor still returns the paper's model, the same as
  from the functional loop's state."""
  from flax import nnx
  r = wagrad.Runner("vmap", K)
  make, _ = CASES[name]
  tx = make(r.axis_name)
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  X = np.random.default_rng(0).normal(size=(K, 8, 3)).astype(np.float32)

  def step(state, x, c):
    model, opt = nnx.merge(graphdef, state)
    loss, g = nnx.value_and_grad(lambda m: jnp.sum((m(x)[:, 0] - c[0]) ** 2))(model)
    wagrad.nnx_update(opt, model, g, value=loss)
    return nnx.state((model, opt))

  def step2(p, s, x, c):
    loss, g = jax.value_and_grad(lambda p: jnp.sum(((x @ p["kernel"] + p["bias"])[:, 0] - c[0]) ** 2))(p)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s

  p0 = {"kernel": jnp.asarray(model.kernel.get_value()), "bias": jnp.asarray(model.bias.get_value())}
  f, f2 = r.map(step), r.map(step2)
  st, p, s = r.replicate(state), r.replicate(p0), r.init(tx, p0)
  for _ in range(3):
    st, (p, s) = f(st, X, TARGETS), f2(p, s, X, TARGETS)
  models, opt = nnx.merge(graphdef, st)
  got = wagrad.evaluated_params(nnx.state(models, nnx.Param), opt.opt_state)
  want = wagrad.evaluated_params(p, s)
  np.testing.assert_allclose(np.asarray(got["kernel"]), np.asarray(want["kernel"]), rtol=1e-5, atol=1e-6)


def test_weighted_model_keeps_the_parameters_dtype_without_warnings():
  """The evaluated mean is computed in float64 and returned in the parameters' dtype
  (float32 here), without JAX's float64 warning."""
  import warnings
  p = {"w": jnp.stack([jnp.ones(3), jnp.full(3, jnp.nan), 3 * jnp.ones(3)])}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = wagrad.evaluated_params(p, wagrad.Runner("vmap", 3).init(
        wagrad.sync_sgd(optax.sgd(0.1)), {"w": jnp.ones(3)}))
  assert out["w"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out["w"]), 2.0)  # the NaN worker left out
