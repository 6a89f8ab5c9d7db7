"""Communication-efficient exchange of model averaging / DiLoCo: compressed exchange
(bfloat16, int8 with error feedback), streaming fragments, the local/global mix;
against a NumPy reference of the rules on every backend."""

import os
import sys

import ml_dtypes
import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

import wagrad
from wagrad._src import compression as Cm
from wagrad._src.averaging_exchange import fragments as _fragments
from _util import BACKENDS, BACKEND_IDS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import common  # noqa: E402  (the benchmarks' reader of compiled collectives)

SIZES = {"a": 300, "b": 40, "c": 5}  # leaves in tree (key) order; 345 parameters


def problem(K, seed=0, n=16):
  rng = np.random.default_rng(seed)
  d = sum(SIZES.values())
  X = rng.normal(size=(K, n, d)).astype(np.float32) / np.sqrt(d)
  Y = rng.normal(size=(K, n)).astype(np.float32)
  return X, Y


def loss(p, X, Y):
  w = jnp.concatenate([p[k] for k in SIZES])
  return jnp.mean((X @ w - Y) ** 2)


def np_grad(w, X, Y):
  return 2.0 * X.T.astype(np.float64) @ (X.astype(np.float64) @ w - Y) / X.shape[0]


def np_dequant(x, mode):
  """Q then deQ of a float32 vector (length a multiple of 256 for int8)."""
  if mode == "bfloat16":
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)
  blocks = x.reshape(-1, 256)
  scale = (np.abs(blocks).max(1) / np.float32(127)).astype(np.float32)
  scale = np.where(scale > 0, scale, np.float32(1))
  q = np.clip(np.round(blocks / scale[:, None]), -127, 127)
  return (q * scale[:, None]).astype(np.float32).ravel()


def np_compressed_mean(D, mode, E):
  """The mean over workers (rows of D) sent as the rule says; returns (mean, new E)."""
  K, n = D.shape
  unit = K * (256 if mode == "int8" else 1)
  padded = -(-n // unit) * unit
  C = (D + (0 if E is None else E)).astype(np.float32)
  Cp = np.zeros((K, padded), np.float32)
  Cp[:, :n] = C
  deq = np.stack([np_dequant(c, mode) for c in Cp])
  m = (deq.sum(0, dtype=np.float32) / np.float32(K)).astype(np.float32)
  mean = np_dequant(m, mode)[:n]
  return mean, (None if E is None else C - deq[:, :n])


def np_model_averaging(X, Y, lr, H, steps, *, mode=None, feedback=True, F=1, alpha=0.0,
                       outer=None):
  """Local SGD; at step s = t + 1, fragment f (of F, leaves cut as `frags`) is exchanged
  when s = floor(H (f+1) / F) mod H: xbar = xg + mean(x_i - xg) (compressed), the outer
  Nesterov step on xg - xbar, then x_i <- (1 - alpha) xg + alpha x_i."""
  K, _, d = X.shape
  x = np.zeros((K, d))
  xg = np.zeros(d, np.float32)
  E = np.zeros((K, d), np.float32) if mode and feedback else None
  mom = np.zeros(d)
  frag_of_leaf = FRAGS[F]
  bounds = np.cumsum([0] + list(SIZES.values()))
  idx = [np.concatenate([np.arange(bounds[j], bounds[j + 1])
                         for j, g in enumerate(frag_of_leaf) if g == f]) for f in range(F)]
  for t in range(steps):
    x = x - lr * np.stack([np_grad(x[i], X[i], Y[i]) for i in range(K)])
    for f in range(F):
      if (t + 1 - (H * (f + 1)) // F) % H:
        continue
      i = idx[f]
      D = (x[:, i] - xg[i]).astype(np.float32)
      if mode is None:
        xbar = x[:, i].mean(0)
      else:
        m, e = np_compressed_mean(D, mode, None if E is None else E[:, i])
        xbar = xg[i] + m
        if E is not None:
          E[:, i] = e
      if outer is None:
        xg[i] = xbar
      else:
        olr, mu = outer
        delta = xg[i] - xbar
        mom[i] = delta + mu * mom[i]
        xg[i] = xg[i] - olr * (delta + mu * mom[i])
      x[:, i] = (1 - alpha) * xg[i] + alpha * x[:, i]
  return x


FRAGS = {1: [0, 0, 0], 2: [0, 1, 1], 3: [0, 1, 2]}


def run(backend, K, steps, **kw):
  r = wagrad.Runner(backend, K)
  tx = wagrad.model_averaging(optax.sgd(0.2), axis_name=r.axis_name, **kw)
  X, Y = problem(K)
  p0 = {k: jnp.zeros(v) for k, v in SIZES.items()}

  def step(p, s, X, Y):
    g = jax.grad(loss)(p, X, Y)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p, s = r.replicate(p0), r.init(tx, p0)
  for _ in range(steps):
    p, s = f(p, s, X, Y)
  return np.concatenate([np.asarray(p[k]) for k in SIZES], axis=1), s, X, Y


CASES = {
    "bf16": dict(compression="bfloat16"),
    "int8": dict(compression="int8"),
    "int8-no-feedback": dict(compression="int8", error_feedback=False),
    "fragments": dict(num_fragments=3),
    "alpha": dict(update_alpha=0.3),
    "diloco-int8-fragments": dict(compression="int8", num_fragments=2,
                                  outer_optimizer=optax.sgd(0.7, 0.9, nesterov=True)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_matches_numpy(backend, K, case):
  kw = CASES[case]
  steps, H = 13, 4
  w, s, X, Y = run(backend, K, steps, sync_period=H, **kw)
  outer = (0.7, 0.9) if "outer_optimizer" in kw else None
  ref = np_model_averaging(X, Y, 0.2, H, steps, mode=kw.get("compression"),
                           feedback=kw.get("error_feedback", True),
                           F=kw.get("num_fragments", 1), alpha=kw.get("update_alpha", 0.0),
                           outer=outer)
  np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)
  if "compression" in kw:  # the test can tell compression from none
    plain = np_model_averaging(X, Y, 0.2, H, steps, F=kw.get("num_fragments", 1), outer=outer)
    assert np.abs(ref - plain).max() > 2e-5
    assert (s.error is not None) == kw.get("error_feedback", True)


def test_compiled_exchange_sends_2x_and_4x_fewer_bytes():
  """The compiled step of an exchange (shard_map, 8 workers, 2^18 parameters): the
  bytes a worker sends in all the collectives of the bfloat16 and int8 programs, against
  a float32 all-reduce of the parameters, which the float32 program holds (it holds a
  second one, in the branch that runs only when a worker is non-finite)."""
  K, n = 8, 2 ** 18
  r = wagrad.Runner("shard_map", K)
  p0 = {"w": jnp.zeros(n), "b": jnp.zeros(10)}
  sent = {}
  for mode in (None, "bfloat16", "int8"):
    tx = wagrad.model_averaging(optax.sgd(0.1), 1, compression=mode, axis_name=r.axis_name)

    def step(p, s):
      u, s = tx.update(p, s, p)
      return wagrad.apply_updates(p, u, s), s
    hlo = r.map(step).lower(r.replicate(p0), r.init(tx, p0)).compile().as_text()
    found = common.collective_bytes(hlo)  # the exchange is in a branch: both parts
    sent[mode] = sum(common.wire_bytes(found[part], K) for part in found)
  f32 = 2 * (K - 1) / K * 4 * n
  assert sent[None] >= f32
  assert f32 / sent["bfloat16"] > 1.95
  assert f32 / sent["int8"] > 3.8


@pytest.mark.parametrize("backend,K", BACKENDS[:2], ids=BACKEND_IDS[:2])
def test_non_finite_worker_heals_with_compression_and_fragments(backend, K):
  """Worker 1's parameters go NaN: it is left out of the compressed mean (its residual
  restarts at 0) and takes x_global, fragment by fragment."""
  r = wagrad.Runner(backend, K)
  tx = wagrad.model_averaging(optax.sgd(0.1), 4, compression="int8", num_fragments=2,
                              axis_name=r.axis_name)
  X, Y = problem(K)
  p0 = {k: jnp.zeros(v) for k, v in SIZES.items()}

  def step(p, s, X, Y, poison):
    g = jax.grad(loss)(p, X, Y)
    p = jax.tree_util.tree_map(lambda x: jnp.where(poison, jnp.nan, x), p)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p, s = r.replicate(p0), r.init(tx, p0)
  for t in range(8):
    p, s = f(p, s, X, Y, np.arange(K) == (1 if t == 0 else -1))
  for k in SIZES:
    x = np.asarray(p[k])
    assert np.isfinite(x).all(), k
    if FRAGS[2][list(SIZES).index(k)] == 1:  # fragment 1 was exchanged at t = 7
      np.testing.assert_array_equal(x[1], np.asarray(s.shared.target[k]))
  assert all(np.isfinite(np.asarray(e)).all() for e in jax.tree_util.tree_leaves(s.error))


def test_fragments_cut_leaves_in_order():
  assert _fragments({k: np.zeros(v) for k, v in SIZES.items()}, 2) == FRAGS[2]
  assert _fragments({k: np.zeros(v) for k, v in SIZES.items()}, 3) == FRAGS[3]
  assert _fragments([np.zeros(1)] * 4 + [np.zeros(1000)], 3) == [0, 0, 0, 1, 2]
  assert _fragments([np.zeros(1000)] + [np.zeros(1)] * 4, 3) == [0, 1, 2, 2, 2]


@pytest.mark.parametrize("kwargs,match", [
    (dict(compression="fp8"), "compression"),
    (dict(compression="int8", exact=False), "exact=True"),
    (dict(update_alpha=1.0), "update_alpha"),
    (dict(num_fragments=2, sync_period=lambda t: 4), "integer `sync_period`"),
    (dict(num_fragments=5, sync_period=4), "integer `sync_period` >= 5"),
    (dict(num_fragments=2, opt_state_sync="average"), "opt_state_sync='local'"),
    (dict(compression="int8", sync_period=None), "periodic"),
])
def test_bad_options_are_named(kwargs, match):
  kw = dict(sync_period=4, **kwargs) if "sync_period" not in kwargs else kwargs
  with pytest.raises(ValueError, match=match):
    wagrad.model_averaging(optax.sgd(0.1), **kw)


def test_too_few_leaves_for_the_fragments():
  tx = wagrad.model_averaging(optax.sgd(0.1), 4, num_fragments=3)
  with pytest.raises(ValueError, match="only 2 leaves"):
    tx.init({"w": jnp.zeros(3), "b": jnp.zeros(1)})


@pytest.mark.slow
def test_digits_compressed_streaming_diloco_converges_with_float32():
  """8 workers on disjoint shards of digits, DiLoCo at H = 8: int8 with error feedback
  over 3 streaming fragments reaches the float32 run's test accuracy within 0.03 (both
  above 0.85; chance is 0.10)."""
  from _util import digits
  from test_easgd import _mlp, _mlp_init, _xent
  (Xtr, ytr), (Xte, yte) = digits()
  K, steps, bs = 8, 240, 32
  runner = wagrad.Runner("vmap", K)
  Xs, ys = runner.shard(Xtr, ytr)
  idx = np.random.default_rng(0).integers(0, Xs.shape[1], size=(K, steps, bs))
  p0 = _mlp_init(jax.random.PRNGKey(0))
  accs = {}
  for name, kw in [("float32", {}), ("int8 F=3", dict(compression="int8", num_fragments=3))]:
    tx = wagrad.diloco(inner=optax.sgd(0.1), sync_period=8, **kw)

    def train(p, s, X, y, idx, tx=tx):
      def one(carry, i):
        p, s = carry
        u, s = tx.update(jax.grad(_xent)(p, X[i], y[i]), s, p)
        return (wagrad.apply_updates(p, u, s), s), None
      return jax.lax.scan(one, (p, s), idx)[0]

    p, s = runner.map(train)(runner.replicate(p0), runner.init(tx, p0), Xs, ys, idx)
    model = wagrad.evaluated_params(p, s)
    accs[name] = float(np.mean(np.argmax(np.asarray(_mlp(model, Xte)), -1) == yte))
  print("digits DiLoCo test accuracy", accs)
  assert min(accs.values()) > 0.85 and accs["int8 F=3"] > accs["float32"] - 0.03, accs


def np_easgd(X, Y, lr, tau, steps, alpha, mode, feedback=True):
  """EASGD (eq. 5-6, from the pre-step values) whose sum_i (x_i - c) is sent compressed:
  K times the compressed mean of the differences."""
  K, _, d = X.shape
  x, c = np.zeros((K, d), np.float32), np.zeros(d, np.float32)
  E = np.zeros((K, d), np.float32) if feedback else None
  for t in range(steps):
    u = -lr * np.stack([np_grad(x[i], X[i], Y[i]) for i in range(K)])
    if (t + 1) % tau == 0:
      diff = (x - c).astype(np.float32)
      m, E = np_compressed_mean(diff, mode, E)
      x = (x + u - alpha * diff).astype(np.float32)
      c = (c + alpha * K * m).astype(np.float32)
    else:
      x = (x + u).astype(np.float32)
  return x, c


@pytest.mark.parametrize("mode", Cm.MODES)
@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_easgd_compressed_matches_numpy(backend, K, mode):
  steps, tau, alpha = 9, 3, 0.1
  r = wagrad.Runner(backend, K)
  tx = wagrad.easgd(optax.sgd(0.2), tau, alpha=alpha, compression=mode, axis_name=r.axis_name)
  X, Y = problem(K)
  p0 = {k: jnp.zeros(v) for k, v in SIZES.items()}

  def step(p, s, X, Y):
    u, s = tx.update(jax.grad(loss)(p, X, Y), s, p)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p, s = r.replicate(p0), r.init(tx, p0)
  for _ in range(steps):
    p, s = f(p, s, X, Y)
  w = np.concatenate([np.asarray(p[k]) for k in SIZES], axis=1)
  center = np.concatenate([np.asarray(s.shared.center[k]) for k in SIZES])
  ref_x, ref_c = np_easgd(X, Y, 0.2, tau, steps, alpha, mode)
  np.testing.assert_allclose(w, ref_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(center, ref_c, rtol=1e-5, atol=1e-6)
  plain_c = np_easgd(X, Y, 0.2, tau, steps, alpha, mode, feedback=False)[1]
  assert np.abs(plain_c - ref_c).max() > 1e-7  # the feedback changes the result


def test_easgd_names_an_unknown_compression():
  with pytest.raises(ValueError, match="unknown `compression` 'fp8'"):
    wagrad.easgd(optax.sgd(0.1), 4, compression="fp8")
