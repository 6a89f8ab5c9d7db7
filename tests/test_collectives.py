"""Collectives vs NumPy, on every backend, including K workers > devices."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import wagrad
from wagrad._src import collectives as C
from _util import BACKENDS, BACKEND_IDS


def _run(backend, K, fn, *args):
  r = wagrad.Runner(backend, K)
  return jax.device_get(r.map(lambda *a: fn(r.axis_name, *a))(*args)), r


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_collectives_match_numpy(backend, K):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(K, 3, 2)).astype(np.float32)
  loss = rng.uniform(0.5, 3.0, size=K).astype(np.float32)
  loss[3] = np.nan  # non-finite worker
  loss[5] = loss[1]  # a tie
  T = 0.7
  best = int(np.nanargmin(loss))

  def fn(ax, x, loss):
    w_soft, ok = C.softmax_weights(loss, ax, temperature=T)
    wm = wagrad.collectives.weighted_mean({"x": x}, w_soft, ax)
    lead = wagrad.collectives.elect_leader(loss, ax)
    b = wagrad.collectives.broadcast_from(x, lead.index, ax)
    cd = wagrad.collectives.consensus_distance(x, ax)
    g = C.all_gather(loss, ax)
    idx = C.worker_index(ax)
    n = C.axis_size(ax)
    # a value NaN on worker 2; the worker with the smallest loss not eligible
    lead2, vmean = C.elect_leader_and_mean(loss, jnp.where(idx == 2, jnp.nan, loss * 2), ax,
                                           eligible=idx != best)
    return (w_soft, ok, wm.value["x"], lead.index, b, cd, g, idx, n * jnp.ones(()),
            lead2.index, lead2.loss, vmean)

  (w, ok, wm, lead, b, cd, g, idx, n, lead2, lmin2, vmean), _ = _run(backend, K, fn, x, loss)
  fin = np.isfinite(loss)
  e = np.where(fin, np.exp(-(np.where(fin, loss, 0) - np.nanmin(loss)) / T), 0.0)
  w_np = e / e.sum()
  np.testing.assert_allclose(w, w_np, rtol=1e-5, atol=1e-7)
  assert w[3] == 0 and np.isclose(w.sum(), 1.0) and ok.all()
  wm_np = np.tensordot(w_np, x.astype(np.float64), axes=1)
  np.testing.assert_allclose(wm[0], wm_np, rtol=1e-5, atol=1e-6)
  assert (wm == wm[0]).all()  # shared
  lead_np = int(np.nanargmin(loss))
  assert (lead == lead_np).all()
  lead2_np = int(np.nanargmin(np.where(np.arange(K) != lead_np, loss, np.nan)))
  assert lead2_np != lead_np and (lead2 == lead2_np).all()
  assert (lmin2 == loss[lead2_np]).all()
  v = np.where(np.arange(K) == 2, np.nan, loss.astype(np.float64) * 2)
  np.testing.assert_allclose(vmean, np.full(K, np.nanmean(v)), rtol=1e-6)
  np.testing.assert_array_equal(b, np.broadcast_to(x[lead_np], x.shape))  # exact
  mean = x.astype(np.float64).mean(0)
  np.testing.assert_allclose(cd[0], ((x - mean) ** 2).sum(axis=(1, 2)).mean(), rtol=1e-5)
  np.testing.assert_array_equal(g[0][fin], loss[fin])
  np.testing.assert_array_equal(idx, np.arange(K))  # axis_index == stacked row
  assert (n == K).all()


def test_all_nonfinite_says_so():
  K = 8
  loss = np.full(K, np.nan, np.float32)
  x = np.ones((K, 2), np.float32)

  def fn(ax, x, loss):
    w, ok = C.softmax_weights(loss, ax)
    wm = wagrad.collectives.weighted_mean(x, w, ax)
    lead = wagrad.collectives.elect_leader(loss, ax)
    _, vmean = C.elect_leader_and_mean(loss, loss, ax)
    return w, ok, wm.value, wm.ok, lead.index, lead.ok, vmean

  (w, ok, v, vok, li, lok, vmean), _ = _run("vmap", K, fn, x, loss)
  assert not ok.any() and not vok.any() and not lok.any()
  assert np.isnan(vmean).all()
  assert (w == 0).all() and (li == -1).all()
  assert np.isfinite(v).all()  # falls back to the worker's own value, not NaN


def test_nonfinite_params_excluded_from_mean():
  K = 8
  x = np.arange(K, dtype=np.float32)[:, None] * np.ones((K, 2), np.float32)
  x[2, 1] = np.inf
  (v,), _ = _run("vmap", K, lambda ax, x: (wagrad.collectives.weighted_mean(x, 1.0, ax).value,), x)
  keep = [i for i in range(K) if i != 2]
  np.testing.assert_allclose(v[0], x[keep].mean(0), rtol=1e-6)


def test_elastic_step_numpy():
  K, alpha = 8, 0.1
  rng = np.random.default_rng(2)
  x = rng.normal(size=(K, 4)).astype(np.float32)
  c = rng.normal(size=4).astype(np.float32)
  r = wagrad.Runner("vmap", K)
  nx, nc = jax.device_get(r.map(lambda x, c: wagrad.collectives.elastic_step(x, c.value, alpha, r.axis_name))(
      x, wagrad.Shared(c)))
  np.testing.assert_allclose(nx, x - alpha * (x - c), rtol=1e-6)
  np.testing.assert_allclose(nc, np.broadcast_to(c + alpha * (x - c).sum(0), nc.shape), rtol=1e-5)


def test_group_and_global_reductions():
  K, G = 8, 2
  x = np.arange(K, dtype=np.float32)
  for backend in ("vmap", "shard_map"):
    r = wagrad.Runner(backend, K, groups=G)
    gm, am = jax.device_get(r.map(lambda x: (C.pmean_tree(x, r.group_axis),
                                             C.pmean_tree(x, r.axis_name)))(x))
    np.testing.assert_allclose(gm, np.repeat(x.reshape(G, -1).mean(1), K // G))
    np.testing.assert_allclose(am, np.full(K, x.mean()))


def test_unbound_axis_and_bad_temperature():
  with pytest.raises(ValueError, match="axis_name 'nope' is not bound"):
    jax.jit(lambda x: C.pmean_tree(x, "nope"))(1.0)
  r = wagrad.Runner("vmap", 4)
  with pytest.raises(ValueError, match="temperature"):
    r.map(lambda l: C.softmax_weights(l, r.axis_name, temperature=-1.0))(np.ones(4))


def test_send_is_one_flat_buffer_per_dtype_or_buckets():
  """Flat, an exchange's message is one all-reduce of one flat buffer per dtype (bf16 leaves
  accumulate in float32 with the float32 ones), or buckets of about ``bucket_bytes`` split
  at leaf boundaries. Same sums either way (checked against NumPy)."""
  from jax import lax
  from wagrad._src import collectives as C
  K = 8
  rng = np.random.default_rng(3)
  tree = {"big": rng.normal(size=(K, 5000)).astype(np.float32),
          "a": rng.normal(size=(K, 7)).astype(np.float32),
          "b": rng.normal(size=(K, 3, 2)).astype(np.float32),
          "h": rng.normal(size=(K, 4)).astype(jnp.bfloat16),
          "n": rng.integers(0, 9, size=(K, 3)).astype(np.int32)}
  r = wagrad.Runner("shard_map", K)
  for bucket_bytes, buffers in ((None, 2), (4 * 5000, 3), (16, 5)):
    f = r.map(lambda t: C.send(t, lambda v: lax.psum(v, r.axis_name), flat=True,
                               bucket_bytes=bucket_bytes))
    out = jax.device_get(f(tree))
    for k, v in tree.items():
      np.testing.assert_allclose(np.asarray(out[k], np.float32),
                                 np.broadcast_to(v.astype(np.float32).sum(0), v.shape),
                                 rtol=1e-2 if k == "h" else 1e-5, atol=1e-5)
      assert out[k].dtype == v.dtype
    # before XLA's own passes (which may combine or split all-reduces per backend)
    assert f.lower(tree).as_text().count("stablehlo.all_reduce") == buffers, bucket_bytes
  # in one process the default sends the leaves as they are (as lax.psum of the tree:
  # one all-reduce per leaf before XLA's passes), never joined
  f = r.map(lambda t: C.send(t, lambda v: lax.psum(v, r.axis_name)))
  text = f.lower(tree).as_text()
  assert text.count("stablehlo.all_reduce") == len(tree) and "concatenate" not in text
  np.testing.assert_allclose(jax.device_get(f(tree))["big"][0], tree["big"].sum(0), rtol=1e-5)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_tree_is_finite_matches_numpy(bad):
  """Exact: huge finite values (whose plain sum overflows) are finite; one inf or NaN in
  any float leaf is not; integer and bool leaves are always finite."""
  from wagrad._src import collectives as C
  big = np.full((4, 5), 3e38, np.float32)           # sum overflows float32, still finite
  tree = {"big": big, "h": np.ones(7, jnp.bfloat16), "i": np.arange(3), "b": np.array([True])}
  if bad is not None:
    tree["h"] = tree["h"].copy()
    tree["h"][3] = bad
  want = all(np.isfinite(np.asarray(v, np.float32)).all() for v in tree.values())
  assert bool(jax.jit(C.tree_is_finite)(tree)) == want == (bad is None)
  assert bool(C.tree_is_finite({"i": np.arange(3)}))
