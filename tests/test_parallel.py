"""Runners: backends, layouts, placement, bad input."""
import numpy as np
import pytest
import jax
import optax

import wagrad
from wagrad._src import collectives as C


def test_bad_runner_arguments():
  with pytest.raises(ValueError, match="unknown backend"):
    wagrad.Runner("mpi", 8)
  with pytest.raises(ValueError, match="not divisible"):
    wagrad.Runner("shard_map", 12)
  with pytest.raises(ValueError, match="num_workers"):
    wagrad.Runner("vmap", 0)
  with pytest.raises(ValueError, match="groups"):
    wagrad.Runner("vmap", 8, groups=3)


def test_pytree_mismatch_between_workers():
  with pytest.raises(TypeError, match="pytree mismatch"):
    wagrad.stack_workers([{"a": np.ones(2)}, {"b": np.ones(2)}])
  with pytest.raises(TypeError, match="pytree mismatch"):
    wagrad.stack_workers([{"a": np.ones(2)}, {"a": np.ones(3)}])


def test_unstacked_argument_is_named():
  r = wagrad.Runner("vmap", 4)
  with pytest.raises(ValueError, match="leading dimension of 4"):
    r.map(lambda x: x)(np.ones(3))


@pytest.mark.parametrize("backend,K,G", [("vmap", 8, 2), ("shard_map", 8, 2), ("shard_map", 16, 4),
                                         ("shard_map", 32, 16), ("pmap", 16, 8)])
def test_two_level_layout_indices(backend, K, G):
  r = wagrad.Runner(backend, K, groups=G)
  idx, gidx, lidx = jax.device_get(r.map(lambda x: (
      C.worker_index(r.axis_name), C.worker_index(r.global_axis),
      C.worker_index(r.group_axis)))(np.zeros(K)))
  np.testing.assert_array_equal(idx, np.arange(K))
  np.testing.assert_array_equal(gidx, np.arange(K) // (K // G))
  np.testing.assert_array_equal(lidx, np.arange(K) % (K // G))


def test_shard_and_keys():
  r = wagrad.Runner("vmap", 4)
  X = np.arange(10 * 3).reshape(10, 3)
  Xs = r.shard(X)
  assert Xs.shape == (4, 2, 3)
  keys = r.worker_keys(jax.random.key(0))
  assert keys.shape == (4,)
  assert len({str(jax.random.key_data(k)) for k in keys}) == 4


@pytest.mark.parametrize("backend", ["vmap", "shard_map", "pmap"])
def test_donation_and_lower_show_the_program_that_runs(backend):
  """``map(..., donate_argnums=)`` donates (the input is consumed, the result is the
  same), and ``lower`` lowers that very program: its module aliases the donated input
  to an output, the undonated one's does not."""
  r = wagrad.Runner(backend, 8)
  fn = lambda x, y: (x * 2.0 + y, y)  # noqa: E731
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  y = np.ones((8, 3), np.float32)
  plain, donating = r.map(fn), r.map(fn, donate_argnums=(0,))
  want = jax.device_get(plain(r.put(x), r.put(y)))
  xd = r.put(jax.numpy.asarray(x))
  got = jax.device_get(donating(xd, r.put(y)))
  np.testing.assert_array_equal(got[0], want[0])
  assert xd.is_deleted()
  alias = lambda f: "input_output_alias" in f.lower(r.put(x), r.put(y)).compile().as_text()  # noqa: E731
  assert alias(donating) and not alias(plain)


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_default_axis_with_more_workers_than_devices_is_an_error(backend):
  """16 workers on 8 devices: a transform left at the default axis name would average
  two groups of 8 that never meet; no runner axis is called "workers" then, and the
  error names runner.axis_name."""
  r = wagrad.Runner(backend, 16)
  assert "workers" not in r.axis_name and len(r.axis_name) == 2
  p0 = {"w": np.zeros(3, np.float32)}
  tx = wagrad.model_averaging(optax.sgd(0.1), 2)

  def step(p, s):
    u, s = tx.update(p, s, p)
    return wagrad.apply_updates(p, u, s), s
  with pytest.raises(ValueError, match="runner.axis_name"):
    r.map(step)(r.replicate(p0), r.init(tx, p0))
  # the runner's own axis covers all 16
  tx = wagrad.model_averaging(optax.sgd(0.1), 1, axis_name=r.axis_name)
  x = np.arange(16, dtype=np.float32)[:, None] * np.ones((16, 3), np.float32)
  p, _ = r.map(step)({"w": x}, r.init(tx, p0))
  np.testing.assert_allclose(np.asarray(p["w"]), np.full((16, 3), 7.5 * 0.9), rtol=1e-6)


def test_stacking_twice_is_refused_with_the_fix():
  """runner.replicate(runner.init(...)) used to give one of five cryptic errors later
  (issue 20); it is refused at once, naming the leaf."""
  r = wagrad.Runner("vmap", 4)
  p0 = {"w": np.zeros(3, np.float32)}
  tx = wagrad.model_averaging(optax.sgd(0.1), 2, axis_name=r.axis_name)
  state = r.init(tx, p0)
  with pytest.raises(ValueError, match="already stacked.*replicate only one worker"):
    r.replicate(state)
  with pytest.raises(ValueError, match=r"\['w'\].*already stacked"):
    r.replicate(r.replicate(p0))
  r.replicate(p0)  # one worker's tree: fine, as often as wanted
