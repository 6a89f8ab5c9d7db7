"""Staleness-aware async SGD (n-softsync): the schedule generator, the protocol against
an independent NumPy parameter-server simulation on every backend, bad arguments,
non-finite gradients, and a convergence comparison on digits."""
import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

import wagrad
from wagrad._src import collectives as C
from wagrad._src import staleness as S
from _util import BACKENDS, BACKEND_IDS, digits, least_squares, ls_grad_np, ls_loss


# ----------------------------------------------------------------------------- generator
# The mean-staleness tests below test the schedule generator (the protocol's timing
# lives there; the jitted transform only applies the rows it is given).


@pytest.mark.parametrize("lam,n", [(8, 1), (8, 2), (8, 4), (8, 8), (16, 4), (30, 5)])
def test_schedule_round_robin_staleness_is_about_n(lam, n):
  T = 400
  s = S.softsync_schedule(lam, n, T, arrival="round_robin")
  c = lam // n
  assert s.c == c and s.n == n and s.num_learners == lam
  assert s.push.shape == s.staleness.shape == s.version.shape == (T, lam)
  assert s.apply.shape == (T,) and s.apply.all()
  assert (s.push.sum(1) == c).all()                       # c gradients per server update
  # fixed cyclic order: step t takes learners (t mod n) * c ... (t mod n) * c + c - 1
  for t in range(T):
    np.testing.assert_array_equal(s.order[t], (t % n) * c + np.arange(c))
  st = s.staleness[s.push]
  assert (s.staleness >= 0).all()
  assert st.max() <= n - 1                                # bounded
  # once every learner has pushed once, every gradient's staleness is exactly n - 1
  # (hardsync 0, lambda-softsync lambda - 1); before that step t < n has staleness t.
  assert (s.staleness[n:][s.push[n:]] == n - 1).all()
  np.testing.assert_array_equal(s.staleness[:n][s.push[:n]], np.repeat(np.arange(n), c))
  # stated tolerance: the mean lies within 1 of n (the paper's ~n counts one more
  # update because its learners pull before their own gradient is applied).
  steady = s.staleness[n:][s.push[n:]].mean()
  assert abs(steady - n) <= 1.0
  np.testing.assert_allclose(st.mean(), (n - 1) - n * (n - 1) / (2 * T))  # first round


@pytest.mark.parametrize("lam,n", [(8, 2), (8, 8), (16, 4)])
def test_schedule_random_arrival(lam, n):
  T, jitter = 2000, 0.5
  s = S.softsync_schedule(lam, n, T, arrival="random", seed=3, jitter=jitter)
  st = s.staleness[s.push]
  assert (s.push.sum(1) == lam // n).all() and s.apply.all()
  assert (s.staleness >= 0).all()
  bound = n * (np.floor((1 + jitter) / (1 - jitter)) + 1)
  assert st.max() <= bound
  assert abs(st.mean() - (n - 1)) < 0.1                   # measured: n - 1 +- 0.02
  # staleness = server version (= step) - version held; pushers pull version t + 1
  np.testing.assert_array_equal(s.staleness, np.arange(T)[:, None] - s.version)
  np.testing.assert_array_equal(s.version[1:][s.push[:-1]],
                                np.repeat(np.arange(1, T), lam // n))
  # the order lists exactly the pushing learners
  for t in range(0, T, 97):
    assert set(s.order[t].tolist()) == set(np.flatnonzero(s.push[t]).tolist())
  # deterministic for a seed
  s2 = S.softsync_schedule(lam, n, T, arrival="random", seed=3, jitter=jitter)
  np.testing.assert_array_equal(s.push, s2.push)
  s3 = S.softsync_schedule(lam, n, T, arrival="random", seed=4, jitter=jitter)
  assert (s.push != s3.push).any()


def test_bad_arguments():
  with pytest.raises(ValueError, match="`n`=3 must divide `num_learners`=8"):
    S.softsync_schedule(8, 3, 10)
  with pytest.raises(ValueError, match="num_learners"):
    S.softsync_schedule(0, 1, 10)
  with pytest.raises(ValueError, match="`n`"):
    S.softsync_schedule(8, 0, 10)
  with pytest.raises(ValueError, match="`n`=16 must be <="):
    S.softsync_schedule(8, 16, 10)
  with pytest.raises(ValueError, match="num_steps"):
    S.softsync_schedule(8, 2, -1)
  with pytest.raises(ValueError, match="arrival"):
    S.softsync_schedule(8, 2, 10, arrival="poisson")
  with pytest.raises(ValueError, match="jitter"):
    S.softsync_schedule(8, 2, 10, arrival="random", jitter=1.0)
  sgd = optax.sgd(1.0)
  for bad in (-0.1, 0.0, float("nan")):
    with pytest.raises(ValueError, match="alpha0"):
      S.staleness_aware_sgd(sgd, alpha0=bad)
  with pytest.raises(TypeError, match="alpha0"):
    S.staleness_aware_sgd(sgd, alpha0="fast")
  with pytest.raises(ValueError, match="modulation"):
    S.staleness_aware_sgd(sgd, modulation="sqrt")
  with pytest.raises(ValueError, match="zero_staleness"):
    S.staleness_aware_sgd(sgd, zero_staleness="zero")
  with pytest.raises(ValueError, match="staleness_bins"):
    S.staleness_aware_sgd(sgd, staleness_bins=1)
  with pytest.raises(TypeError, match="inner"):
    S.staleness_aware_sgd(object())
  with pytest.raises(TypeError, match="axis_name"):
    S.staleness_aware_sgd(sgd, axis_name=3)
  # missing schedule row / unbound axis
  tx = S.staleness_aware_sgd(sgd)
  p = {"w": jnp.zeros(3)}
  s = tx.init(p)
  with pytest.raises(TypeError, match="push"):
    jax.vmap(lambda p: tx.update(p, s, p), axis_name="workers")(
        {"w": jnp.zeros((2, 3))})
  with pytest.raises(ValueError, match="not bound"):
    tx.update(p, s, p, push=True)


# ----------------------------------------------------------------------------- reference


def np_softsync(sched, A, b, steps, *, lr, momentum, alpha0, modulation, zero_staleness,
                bad=None):
  """Independent parameter-server simulation (float64): the server keeps its version
  history, each learner remembers the version it pulled and computes its gradient on
  that version; the server's optimizer is SGD with heavy-ball momentum (optax's
  trace). Returns per step: learners' params, server params, staleness, c."""
  lam = A.shape[0]
  history = [np.zeros(A.shape[2])]
  vel = np.zeros(A.shape[2])
  pulled = np.zeros(lam, np.int64)
  out = []
  for t in range(steps):
    V = len(history) - 1
    stal = V - pulled
    c = 0
    if sched.apply[t]:
      pushers = np.flatnonzero(sched.push[t])
      ok = [l for l in pushers if bad is None or not bad[t, l]]
      c = len(ok)
      if ok:
        G = np.zeros_like(history[-1])
        for l in ok:
          g = ls_grad_np(history[pulled[l]], A[l], b[l])
          if modulation == "none":
            tau = 1.0
          elif zero_staleness == "max1":
            tau = max(stal[l], 1)
          else:
            tau = stal[l] + 1
          G += alpha0 / tau * g
        G /= c
        vel = G + momentum * vel
        history.append(history[-1] - lr * vel)
      pulled[pushers] = len(history) - 1
    learners = np.stack([history[v] for v in pulled])
    out.append((learners, history[-1].copy(), stal.copy(), c))
  return out


def with_noop_row(sched, at):
  """The schedule with an extra step at ``at`` where nobody pushes and the server
  does not apply (exercises the skipped branch); staleness recomputed for the shift."""
  push = np.insert(sched.push, at, False, axis=0)
  apply = np.insert(sched.apply, at, False)
  version = np.insert(sched.version, at, sched.version[at], axis=0)
  V = np.cumsum(np.concatenate([[0], apply[:-1]]))     # server version before each step
  return sched._replace(push=push, apply=apply, version=version,
                        staleness=(V[:, None] - version).astype(np.int32))


def make_step(tx, axis_name, pass_staleness, nan_flags=False):
  def step(p, s, A, b, push, stal, apply, bad):
    g = jax.grad(ls_loss)(p, A, b)
    if nan_flags:
      g = jax.tree_util.tree_map(lambda x: jnp.where(bad, jnp.nan, x), g)
    u, s = tx.update(g, s, p, push=push, staleness=stal if pass_staleness else None,
                     apply=apply)
    p = S.staleness_apply(p, u, s)
    # every worker's view of the shared server params (to check they are identical)
    return p, s, C.all_gather(s.shared.server["w"], axis_name)
  return step


def run_protocol(backend, K, sched, steps, *, pass_staleness=False, bad=None, **kw):
  r = wagrad.Runner(backend, K)
  opts = dict(kw)
  lr, momentum = opts.pop("lr"), opts.pop("momentum")
  tx = S.staleness_aware_sgd(optax.sgd(lr, momentum=momentum), axis_name=r.axis_name, **opts)
  A, b = least_squares(K, seed=1)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  f = r.map(make_step(tx, r.axis_name, pass_staleness, nan_flags=bad is not None))
  bad_t = np.zeros((steps, K), bool) if bad is None else bad
  rec = []
  for t in range(steps):
    p, s, views = f(p, s, A, b, *sched.row(t), bad_t[t])
    rec.append((np.asarray(p["w"]), np.asarray(s.shared.server["w"]), np.asarray(views),
                np.asarray(s.staleness), np.asarray(s.pulled), int(s.shared.num_exchanges),
                int(s.shared.last_num_gradients)))
  return rec, s, A, b


def check_against_numpy(rec, ref, sched):
  for t, ((w, server, views, stal, pulled, n_ex, c), (w_ref, srv_ref, stal_ref, c_ref)) in \
      enumerate(zip(rec, ref)):
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
    np.testing.assert_allclose(server, srv_ref, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
    # shared leaves identical on every worker
    assert (views == views[:1]).all(), f"server differs across workers at step {t}"
    np.testing.assert_array_equal(views[0], np.broadcast_to(server, views[0].shape))
    # the transform's own staleness = the generator's table = the NumPy simulation's
    np.testing.assert_array_equal(stal, sched.staleness[t])
    np.testing.assert_array_equal(stal, stal_ref)
    np.testing.assert_array_equal(pulled, sched.push[t] & sched.apply[t])
    assert c == c_ref
    # exact pull: learners that pushed hold the server params bit for bit
    assert (w[pulled] == server).all()
    assert n_ex == int(sched.apply[: t + 1].sum())


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_matches_numpy_parameter_server(backend, K):
  steps = 7   # few steps: the pmap runner is slow per step on forced CPU devices
  sched = with_noop_row(S.softsync_schedule(K, 2, steps, arrival="random", seed=2), at=3)
  kw = dict(lr=0.1, momentum=0.9, alpha0=0.7, modulation="inverse", zero_staleness="max1")
  rec, s, A, b = run_protocol(backend, K, sched, steps, **kw)
  ref = np_softsync(sched, A, b, steps, **kw)
  check_against_numpy(rec, ref, sched)
  sh = s.shared
  assert int(sh.count) == steps and int(sh.num_exchanges) == steps - 1
  assert int(sh.last_exchange) == steps
  st = sched.staleness[:steps][sched.push[:steps] & sched.apply[:steps, None]]
  assert int(sh.num_gradients) == st.size
  np.testing.assert_array_equal(np.asarray(sh.histogram)[:10], np.bincount(st, minlength=10)[:10])
  np.testing.assert_allclose(float(sh.mean_staleness), st.mean(), rtol=1e-6)


@pytest.mark.parametrize("modulation,zero_staleness,arrival,n", [
    ("inverse", "plus1", "round_robin", 4),
    ("none", "max1", "random", 8),      # plain ASGD, lambda-softsync
    ("inverse", "max1", "round_robin", 1),  # hardsync: staleness 0 -> alpha0
])
def test_variants_match_numpy(modulation, zero_staleness, arrival, n):
  K, steps = 8, 12
  sched = S.softsync_schedule(K, n, steps, arrival=arrival, seed=5)
  kw = dict(lr=0.05, momentum=0.5, alpha0=1.3, modulation=modulation,
            zero_staleness=zero_staleness)
  rec, _, A, b = run_protocol("vmap", K, sched, steps, pass_staleness=True, **kw)
  check_against_numpy(rec, np_softsync(sched, A, b, steps, **kw), sched)
  if n == 1:  # hardsync keeps every learner on the server params
    assert all((r[0] == r[1]).all() for r in rec)


def test_nonfinite_gradient_is_excluded():
  K, steps = 8, 8
  sched = S.softsync_schedule(K, 2, steps, arrival="round_robin")
  bad = np.zeros((steps, K), bool)
  bad[2, sched.order[2][0]] = True           # one pusher's gradient is NaN at step 2
  bad[5, 3] = True                           # a non-pusher's NaN must not leak in
  assert not sched.push[5, 3]
  kw = dict(lr=0.1, momentum=0.0, alpha0=1.0, modulation="inverse", zero_staleness="max1")
  rec, s, A, b = run_protocol("vmap", K, sched, steps, bad=bad, **kw)
  ref = np_softsync(sched, A, b, steps, bad=bad, **kw)
  check_against_numpy(rec, ref, sched)
  assert rec[2][-1] == K // 2 - 1            # c counted the finite gradients only
  assert all(np.isfinite(r[0]).all() for r in rec)


def test_plain_optax_apply_updates_within_one_ulp_and_static_apply():
  """Through optax.apply_updates (no exact pull) pushers are within 1 ulp of the server,
  non-pushers unchanged bit for bit; apply=None runs the exchange every step."""
  K, steps = 8, 6
  sched = S.softsync_schedule(K, 4, steps)
  r = wagrad.Runner("vmap", K)
  tx = S.staleness_aware_sgd(optax.sgd(0.1), axis_name=r.axis_name)
  A, b = least_squares(K, seed=1)

  def step(p, s, A, b, push):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, push=push)
    return wagrad.apply_updates(p, u, s), s, u

  f = r.map(step)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  for t in range(steps):
    prev = np.asarray(p["w"])
    p, s, u = f(p, s, A, b, sched.push[t])
    w, server = np.asarray(p["w"]), np.asarray(s.shared.server["w"])
    np.testing.assert_array_equal(w[~sched.push[t]], prev[~sched.push[t]])
    assert (np.asarray(u["w"])[~sched.push[t]] == 0).all()
    ulp = np.spacing(np.abs(server).astype(np.float32))
    assert (np.abs(w[sched.push[t]] - server) <= ulp).all()
  assert int(s.shared.num_exchanges) == steps


# ----------------------------------------------------------------------------- convergence


def _mlp_init(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (64, 32)) * np.sqrt(2 / 64), "b1": jnp.zeros(32),
          "w2": jax.random.normal(k2, (32, 10)) * np.sqrt(1 / 32), "b2": jnp.zeros(10)}


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _digits_run(modulation, alpha0, steps=300, K=8, batch=32, seed=0):
  (Xtr, ytr), (Xte, yte) = digits()
  r = wagrad.Runner("vmap", K)
  tx = S.staleness_aware_sgd(optax.sgd(1.0), alpha0=alpha0, modulation=modulation,
                             axis_name=r.axis_name)
  sched = S.softsync_schedule(K, K, steps, arrival="random", seed=seed)  # lambda-softsync

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), y).mean()

  def step(p, s, x, y, push, stal, apply):
    g = jax.grad(loss)(p, x, y)
    u, s = tx.update(g, s, p, push=push, staleness=stal, apply=apply)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p0 = _mlp_init(jax.random.PRNGKey(seed))
  p, s = r.replicate(p0), r.init(tx, p0)
  rng = np.random.default_rng(seed)
  for t in range(steps):
    idx = rng.integers(0, len(Xtr), size=(K, batch))
    p, s = f(p, s, Xtr[idx], ytr[idx], *sched.row(t))
  acc = float((np.argmax(np.asarray(_mlp(s.shared.server, Xte)), -1) == yte).mean())
  return acc, float(s.shared.mean_staleness)


@pytest.mark.slow
def test_digits_staleness_aware_vs_plain_asgd():
  """lambda-softsync with 8 learners (mean staleness about 7), random arrival, 300
  server updates of one 32-example gradient each, server = the evaluated model.
  Measured (seed 0): alpha0=0.2: modulated 0.874, plain ASGD 0.897; alpha0=0.5:
  modulated 0.927, plain ASGD diverges (0.128). Seeds 1-3 agree (modulated 0.86-0.94,
  plain at 0.5 <= 0.11). Chance is 0.1."""
  res = {}
  for alpha0 in (0.2, 0.5):
    for mod in ("inverse", "none"):
      res[alpha0, mod] = _digits_run(mod, alpha0)
      print(f"alpha0={alpha0} modulation={mod}: test accuracy {res[alpha0, mod][0]:.3f} "
            f"(mean staleness {res[alpha0, mod][1]:.2f})")
  assert abs(res[0.2, "inverse"][1] - 7) < 0.3
  # at a small alpha0 both learn well above chance (0.1)
  assert res[0.2, "inverse"][0] > 0.7 and res[0.2, "none"][0] > 0.7
  # at a larger alpha0 the staleness-aware rule stays stable, plain ASGD does not
  assert res[0.5, "inverse"][0] > 0.85
  assert res[0.5, "inverse"][0] > res[0.5, "none"][0] + 0.3
