"""Packed shared state: one buffer per dtype at the jit boundary, fields read as trees."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import wagrad
from wagrad._src import base


def _params():
  return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3), "n": {"k": jnp.zeros((4,))}}


def test_shared_state_packs_to_one_buffer_per_dtype():
  p = _params()
  r = wagrad.Runner("vmap", 4)
  for tx in (wagrad.model_averaging(optax.sgd(0.1), 4), wagrad.easgd(optax.sgd(0.1), 4),
             wagrad.lsgd(optax.sgd(0.1), 4), wagrad.wasgd(optax.sgd(0.1), 4)):
    st = r.init(tx, p)
    sh = base.find_shared(st, "count")
    leaves = jax.tree_util.tree_leaves(sh)
    dtypes = [x.dtype for x in leaves]
    assert len(leaves) == len(set(dtypes)) <= 3, (type(sh).__name__, dtypes)
    assert int(sh.count) == 0 and int(sh.num_exchanges) == 0 and not bool(sh.assign)
  # fields still read as the trees they were built from
  st = r.init(wagrad.easgd(optax.sgd(0.1), 4), p)
  c = wagrad.easgd_center(st)
  assert jax.tree_util.tree_structure(c) == jax.tree_util.tree_structure(p)
  for a, b in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(p)):
    np.testing.assert_array_equal(a, b)


def test_packed_state_under_eval_shape_and_tree_map():
  p = _params()
  tx = wagrad.lsgd(optax.sgd(0.1), 4)
  shapes = jax.eval_shape(tx.init, p)
  lp = shapes.shared.leader_params
  assert jax.tree_util.tree_map(lambda s: s.shape, lp) == jax.tree_util.tree_map(jnp.shape, p)
  st = tx.init(p)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, st)
  assert int(zeros.shared.count) == 0
  assert all(float(jnp.sum(jnp.abs(x))) == 0.0
             for x in jax.tree_util.tree_leaves(zeros.shared.leader_params))
