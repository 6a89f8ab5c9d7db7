"""Tests of LSGD, multi-leader LSGD, asynchronous LSGD (wagrad/_src/lsgd.py).

The NumPy references below are written from the equations in the docstrings and docs/algorithms.md
(float64), not by calling the library.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wagrad
from wagrad._src import base
from wagrad._src import collectives as C
from wagrad._src import lsgd as L
from wagrad._src import schedules

import _util

LR = 0.1


# ----------------------------------------------------------------------------- references


def _running(buf, size):
  return float(np.mean(buf[-size:])) if buf else np.inf


def _argmin(r, eligible=None):
  """Index of the smallest finite r (ties: lowest index); None if none is eligible."""
  r = np.asarray(r, dtype=np.float64)
  ok = np.isfinite(r) if eligible is None else np.isfinite(r) & eligible
  if not ok.any():
    return None
  return int(np.argmin(np.where(ok, r, np.inf)))


def _drift(x, L, rows=None):
  """Mean over the given rows (default all) with finite values of ||x_i - L||^2."""
  d = ((x - L) ** 2).sum(1)
  d = d[rows] if rows is not None else d
  return float(d[np.isfinite(d)].mean()) if np.isfinite(d).any() else np.nan


def np_lsgd(A, b, w0, steps, *, tau, pull, prox, avg, warmup=0, active=None, exchange=None,
            x0=None, drifts=None):
  """LSGD (sync) in float64: local SGD step, proximal pull, leader pull every tau steps.
  ``drifts``: a list that gets the drift metric of every exchange (after the warm-up)."""
  K = A.shape[0]
  x = np.tile(np.asarray(w0, np.float64), (K, 1)) if x0 is None else np.array(x0, np.float64)
  Lc = np.asarray(w0, np.float64).copy()
  bufs = [[] for _ in range(K)]
  last, leaders, exch_steps = 0, [], []
  for t in range(steps):
    act = np.ones(K, bool) if active is None else active[t]
    loss = np.array([_util.ls_loss_np(x[i], A[i], b[i]) for i in range(K)])
    g = np.stack([_util.ls_grad_np(x[i], A[i], b[i]) for i in range(K)])
    if t < warmup:
      g = np.tile(g.mean(0), (K, 1))
    for i in range(K):
      if act[i]:
        x[i] = x[i] - LR * g[i]
        bufs[i].append(loss[i])
    r = np.array([_running(bf, avg) for bf in bufs])
    if t >= warmup and prox > 0:
      for i in range(K):
        if act[i]:
          x[i] = x[i] - prox / tau * (x[i] - Lc)
    if warmup and t == warmup - 1:
      x[:] = x[0]
      Lc = x[0].copy()
      last = t + 1
      exch_steps.append(t)
      continue
    ex = (t + 1 - last >= tau) if exchange is None else exchange[t]
    if t >= warmup and ex:
      l = _argmin(r, np.isfinite(x).all(1))
      if drifts is not None:
        drifts.append(_drift(x, Lc))
      Lc = x[l].copy()
      x = x - pull * (x - Lc)
      last = t + 1
      leaders.append(l)
      exch_steps.append(t)
  return x, Lc, leaders, exch_steps


def np_multi(A, b, w0, steps, *, G, lp, gp, c1, c2, p1, p2, avg, drifts=None):
  """Multi-leader LSGD in float64 (groups of consecutive workers). ``lp`` / ``gp``: an
  integer or a schedule t -> period; a level's round is due once that many steps have
  passed since its own last round (a global round only at a local one)."""
  lp_fn = lp if callable(lp) else (lambda t: lp)
  gp_fn = gp if callable(gp) else (lambda t: gp)
  last_local = last_global = 0
  K = A.shape[0]
  W = K // G
  x = np.tile(np.asarray(w0, np.float64), (K, 1))
  Ll = x.copy()
  Lg = np.asarray(w0, np.float64).copy()
  bufs = [[] for _ in range(K)]
  use_local = c1 > 0 or p1 > 0
  gleaders = []
  for t in range(steps):
    loss = np.array([_util.ls_loss_np(x[i], A[i], b[i]) for i in range(K)])
    g = np.stack([_util.ls_grad_np(x[i], A[i], b[i]) for i in range(K)])
    x = x - LR * g
    for i in range(K):
      bufs[i].append(loss[i])
    r = np.array([_running(bf, avg) for bf in bufs])
    if p2 > 0:
      x = x - p2 / gp_fn(t) * (x - Lg)
    if use_local and p1 > 0:
      x = x - p1 / lp_fn(t) * (x - Ll)
    if t + 1 - last_local >= lp_fn(t):
      last_local = t + 1
      if use_local:
        for gr in range(G):
          sl = slice(gr * W, (gr + 1) * W)
          l = gr * W + _argmin(r[sl])
          lead = x[l].copy()
          Ll[sl] = lead
          x[sl] = x[sl] - c1 * (x[sl] - lead)
      if t + 1 - last_global >= gp_fn(t):
        last_global = t + 1
        l = _argmin(r)
        if drifts is not None:
          drifts.append(_drift(x, Lg))
        Lg = x[l].copy()
        x = x - c2 * (x - Lg)
        gleaders.append(l)
  return x, Lg, gleaders


def np_async(A, b, w0, active, *, tau, pull, avg, drifts=None):
  """Asynchronous LSGD as reconstructed (master keeps the best reported leader).
  ``tau``: an int, or a schedule (first report after tau(0) own steps, then tau(n)
  own steps after each). ``drifts``: gets the drift metric of every report step."""
  T, K = active.shape
  due = np.full(K, max(1, int(tau(0))) if callable(tau) else 0)
  x = np.tile(np.asarray(w0, np.float64), (K, 1))
  Lm, rm, origin = np.asarray(w0, np.float64).copy(), np.inf, -1
  bufs = [[] for _ in range(K)]
  n = np.zeros(K, int)
  replacements = 0
  for t in range(T):
    a = active[t]
    for i in range(K):
      if a[i]:
        loss = _util.ls_loss_np(x[i], A[i], b[i])
        x[i] = x[i] - LR * _util.ls_grad_np(x[i], A[i], b[i])
        bufs[i].append(loss)
        n[i] += 1
    if callable(tau):
      R = a & (n == due)
      for i in np.nonzero(R)[0]:
        due[i] = n[i] + max(1, int(tau(n[i])))
    else:
      R = a & (n % tau == 0)
    if R.any():
      r = np.array([_running(bf, avg) for bf in bufs])
      l = _argmin(r, R)
      if drifts is not None:
        drifts.append(_drift(x, Lm, R))
      if l is not None and r[l] < rm:
        Lm, rm, origin = x[l].copy(), r[l], l
        replacements += 1
      x[R] = x[R] - pull * (x[R] - Lm)
  return x, Lm, origin, replacements


# ----------------------------------------------------------------------------- helpers


def ls_step(tx, axis_name, gather_shared=False):
  def step(p, s, A, b):
    loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss)
    out = (wagrad.apply_updates(p, u, s), s)
    if gather_shared:
      sh = s.shared
      out += (C.all_gather((sh.count, sh.leader, sh.leader_loss, sh.leader_params,
                            sh.mix_weights, sh.num_exchanges), axis_name),)
    return out
  return step


def mapped(r, fn):
  """``r.map(fn)``; for pmap a pmapped function built once (the runner's pmap path
  builds a new ``jax.pmap`` on every call, recompiling each step)."""
  if r.backend != "pmap" or r.num_workers != r.num_devices:
    return r.map(fn)
  cache = {}

  def call(*args):
    key = jax.tree_util.tree_structure(args)
    if key not in cache:
      in_axes = tuple(base.worker_axes(a) for a in args)
      out = jax.eval_shape(jax.vmap(fn, in_axes=in_axes, axis_name=r.axis_name), *args)
      cache[key] = jax.pmap(fn, axis_name=r.axis_name, in_axes=in_axes,
                            out_axes=base.worker_axes(out), devices=r.devices)
    return jax.block_until_ready(cache[key](*args))

  return call


def assert_rows_equal(tree):
  for leaf in jax.tree_util.tree_leaves(tree):
    leaf = np.asarray(leaf)
    assert (leaf == leaf[:1]).all() | (np.isnan(leaf) & np.isnan(leaf[:1])).all()


P0 = {"w": jnp.zeros(3, jnp.float32)}


# ----------------------------------------------------------------------------- LSGD


@pytest.mark.parametrize("backend,K", _util.BACKENDS, ids=_util.BACKEND_IDS)
def test_lsgd_matches_numpy(backend, K):
  r = wagrad.Runner(backend, K)
  A, b = _util.least_squares(K)
  cfg = dict(tau=3, pull=0.3, prox=0.2, avg=2, warmup=2)
  tx = L.lsgd(optax.sgd(LR), cfg["tau"], pull=cfg["pull"], proximal=cfg["prox"],
              avg_size=cfg["avg"], warmup_steps=cfg["warmup"], axis_name=r.axis_name,
              num_workers=K)
  f = mapped(r, ls_step(tx, r.axis_name, gather_shared=True))
  p, s = r.replicate(P0), r.init(tx, P0)
  steps = 11
  leaders, ex_steps, drifts = [], [], []
  for t in range(steps):
    p, s, gathered = f(p, s, A, b)
    assert_rows_equal(gathered)      # shared leaves identical on every worker
    if bool(s.shared.exchanged):
      ex_steps.append(t)
      if t >= cfg["warmup"]:
        leaders.append(int(s.shared.leader))
        drifts.append(float(s.shared.pull_distance))
        np.testing.assert_array_equal(np.asarray(s.shared.mix_weights),
                                      np.eye(K)[int(s.shared.leader)])
  drift_ref = []
  x_ref, L_ref, lead_ref, ex_ref = np_lsgd(A, b, np.zeros(3), steps, drifts=drift_ref, **cfg)
  assert ex_steps == ex_ref == [1, 4, 7, 10]
  np.testing.assert_allclose(drifts, drift_ref, rtol=1e-4)
  assert min(drift_ref) > 0
  assert int(s.shared.num_exchanges) == 4 and int(s.shared.count) == steps
  assert leaders == lead_ref
  np.testing.assert_allclose(np.asarray(p["w"]), x_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.shared.leader_params["w"]), L_ref, rtol=1e-5,
                             atol=1e-6)


def test_lsgd_pull_one_assigns_leader_exactly():
  K = 8
  r = wagrad.Runner("vmap", K)
  A, b = _util.least_squares(K)
  tx = L.lsgd(optax.sgd(LR), 2, pull=1.0, proximal=0.0, num_workers=K)
  f = r.map(ls_step(tx, r.axis_name))
  p, s = r.replicate(P0), r.init(tx, P0)
  for t in range(4):
    p, s = f(p, s, A, b)
    if t % 2 == 1:
      assert bool(s.shared.assign)
      w = np.asarray(p["w"])
      assert (w == w[:1]).all()                              # bit-identical workers
      assert (w[0] == np.asarray(s.shared.leader_params["w"])).all()
    else:
      assert not bool(s.shared.assign)
  x_ref, *_ = np_lsgd(A, b, np.zeros(3), 4, tau=2, pull=1.0, prox=0.0, avg=2)
  np.testing.assert_allclose(np.asarray(p["w"]), x_ref, rtol=1e-5, atol=1e-6)


def test_lsgd_is_lgd_with_full_batch():
  """[derived] Full-batch gradients, tau=1, avg_size=1, proximal=0: LSGD is LGD.

  Every worker holds the whole data set (the same objective f) and starts elsewhere;
  LGD: l = argmin_j f(x_j); y_i = x_i - eta grad f(x_i); x_i <- y_i - c (y_i - y_l).
  """
  K, c, steps = 8, 0.2, 40
  r = wagrad.Runner("vmap", K)
  A0, b0 = _util.least_squares(K)
  A_all, b_all = A0.reshape(-1, 3), b0.reshape(-1)
  A, b = np.broadcast_to(A_all, (K,) + A_all.shape), np.broadcast_to(b_all, (K, len(b_all)))
  x0 = np.random.default_rng(1).normal(size=(K, 3)).astype(np.float32)
  tx = L.lsgd(optax.sgd(LR), 1, pull=c, proximal=0.0, avg_size=1, num_workers=K)
  f = r.map(ls_step(tx, r.axis_name))
  p, s = {"w": jnp.asarray(x0)}, r.init(tx, P0)
  # NumPy LGD on the common objective f
  x = x0.astype(np.float64)
  for _ in range(steps):
    p, s = f(p, s, A, b)
    fx = [_util.ls_loss_np(xi, A_all, b_all) for xi in x]
    l = int(np.argmin(fx))
    y = x - LR * np.stack([_util.ls_grad_np(xi, A_all, b_all) for xi in x])
    x = y - c * (y - y[l])
  np.testing.assert_allclose(np.asarray(p["w"]), x, rtol=1e-4, atol=1e-5)
  w_star = np.linalg.lstsq(A_all.astype(np.float64), b_all.astype(np.float64), rcond=None)[0]
  np.testing.assert_allclose(np.asarray(s.shared.leader_params["w"]), w_star, atol=2e-3)


def test_uneven_local_steps_schedule_matches_numpy():
  """The authors' asynchrony: blocking rounds after K * l_comm local steps in total."""
  K, l_comm, steps = 8, 2, 16
  r = wagrad.Runner("vmap", K)
  A, b = _util.least_squares(K)
  active = schedules.speed_schedule(K, steps, schedules.straggler_speeds(K, 0.25, 4.0), seed=3)
  rounds = wagrad.schedules.uneven_round_steps(active, l_comm)
  assert rounds.sum() >= 3
  # every round follows K * l_comm local steps in total
  ends = np.flatnonzero(rounds)
  totals = np.diff(np.concatenate([[0], np.cumsum(active.sum(1))[ends]]))
  assert (totals >= K * l_comm).all() and (totals < K * l_comm + K).all()
  tx = L.lsgd(optax.sgd(LR), l_comm, pull=0.3, proximal=0.1, num_workers=K)

  def step(p, s, A, b, a, ex):
    loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss, active=a, any_exchange=ex.value)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p, s = r.replicate(P0), r.init(tx, P0)
  for t in range(steps):
    p, s = f(p, s, A, b, jnp.asarray(active[t]), wagrad.Shared(jnp.asarray(rounds[t])))
  x_ref, _, _, ex_ref = np_lsgd(A, b, np.zeros(3), steps, tau=l_comm, pull=0.3, prox=0.1,
                                avg=l_comm, active=active, exchange=rounds)
  assert int(s.shared.num_exchanges) == len(ex_ref) == rounds.sum()
  np.testing.assert_allclose(np.asarray(p["w"]), x_ref, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_never_elected_and_heals():
  K, bad = 8, 2
  r = wagrad.Runner("vmap", K)
  A, b = _util.least_squares(K)
  # make the bad worker's true loss the smallest, so only the NaN keeps it out
  b = b.copy()
  b[bad] = A[bad] @ np.array([0.0, 0.0, 0.0], np.float32)
  tx = L.lsgd(optax.sgd(LR), 3, pull=0.5, proximal=0.1, num_workers=K)

  def step(p, s, A, b, nan):
    loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=jnp.where(nan, jnp.nan, loss))
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p, s = r.replicate(P0), r.init(tx, P0)
  nan = np.arange(K) == bad
  for t in range(9):
    p, s = f(p, s, A, b, jnp.asarray(nan))
    assert np.isfinite(np.asarray(p["w"])).all()
    if bool(s.shared.exchanged):
      assert int(s.shared.leader) != bad and np.isfinite(float(s.shared.leader_loss))
  # once its losses are finite again (after avg_size steps) it can lead: here it must
  for t in range(6):
    p, s = f(p, s, A, b, jnp.zeros(K, bool))
  assert int(s.shared.leader) == bad


def test_nonfinite_params_do_not_spread_and_heal_with_pull_one():
  K, bad = 8, 5
  r = wagrad.Runner("vmap", K)
  A, b = _util.least_squares(K)
  for pull in (0.5, 1.0):
    tx = L.lsgd(optax.sgd(LR), 2, pull=pull, proximal=0.1, num_workers=K)
    f = r.map(ls_step(tx, r.axis_name))
    w = np.zeros((K, 3), np.float32)
    w[bad] = np.nan
    p, s = {"w": jnp.asarray(w)}, r.init(tx, P0)
    for t in range(4):
      p, s = f(p, s, A, b)
      if bool(s.shared.exchanged):
        assert int(s.shared.leader) != bad
    w = np.asarray(p["w"])
    others = np.arange(K) != bad
    assert np.isfinite(w[others]).all()
    assert np.isfinite(np.asarray(s.shared.leader_params["w"])).all()
    # wagrad.apply_updates gives the bad worker the leader at the exchange: it heals
    assert np.isfinite(w).all()
    if pull == 1.0:
      assert (w == w[:1]).all()


def test_lsgd_requires_value_and_checks_num_workers():
  r = wagrad.Runner("vmap", 4)
  tx = L.lsgd(optax.sgd(LR), 2)

  def step(p, s):
    u, s = tx.update(p, s, p)
    return p, s

  with pytest.raises(TypeError, match="value"):
    r.map(step)(r.replicate(P0), r.init(tx, P0))
  tx8 = L.lsgd(optax.sgd(LR), 2, num_workers=8)

  def step8(p, s):
    u, s = tx8.update(p, s, p, value=jnp.float32(1.0))
    return p, s

  with pytest.raises(ValueError, match="num_workers"):
    r.map(step8)(r.replicate(P0), r.init(tx8, P0))


def test_mix_weights_inferred_inside_mapped_init():
  r = wagrad.Runner("vmap", 4)
  tx = L.lsgd(optax.sgd(LR), 2)
  # Runner.init binds the axis names, so K is known at init without num_workers=
  assert r.init(tx, P0).shared.mix_weights.shape == (4,)
  assert tx.init(P0).shared.mix_weights is None  # outside any mapped function: unknown
  st = jax.vmap(lambda p: tx.init(p).shared.mix_weights, axis_name="workers",
                out_axes=None)({"w": jnp.zeros((4, 3))})
  assert st.shape == (4,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pull=0.0), "pull"), (dict(pull=1.5), "pull"), (dict(pull=float("nan")), "pull"),
    (dict(proximal=1.0), "proximal"), (dict(proximal=-0.1), "proximal"),
    (dict(avg_size=0), "avg_size"), (dict(sync_period=0), "sync_period"),
    (dict(num_workers=0), "num_workers"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(opt_state_sync="bogus"), "opt_state_sync"),
    (dict(sync_period=lambda t: 4), "avg_size"),
])
def test_lsgd_bad_hyperparameters(kwargs, match):
  kw = dict(sync_period=4)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    L.lsgd(optax.sgd(LR), **kw)


def test_bad_hyperparameters_multi_and_async():
  mk = lambda **kw: wagrad.multi_leader_lsgd(optax.sgd(LR), **{**dict(
      group_axis="local", global_axis="groups", local_period=2, global_period=4), **kw})
  with pytest.raises(ValueError, match="global_period"):
    mk(global_period=5)
  with pytest.raises(ValueError, match="local_period"):
    mk(local_period=0)
  with pytest.raises(ValueError, match="local_pull"):
    mk(local_pull=1.1)
  with pytest.raises(ValueError, match="global_proximal"):
    mk(global_proximal=1.0)
  with pytest.raises(TypeError, match="group_axis"):
    mk(group_axis=3)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.async_lsgd(optax.sgd(LR), 0)
  # periods may be schedules; None or a schedule returning < 1 is refused by name
  with pytest.raises(ValueError, match="local_period"):
    mk(local_period=None)
  with pytest.raises(ValueError, match="global_period"):
    mk(global_period=lambda t: 1 - t // 10, avg_size=2)
  with pytest.raises(ValueError, match="avg_size"):
    mk(local_period=lambda t: 2)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.async_lsgd(optax.sgd(LR), None)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.async_lsgd(optax.sgd(LR), lambda n: 0, avg_size=2)
  with pytest.raises(ValueError, match="pull"):
    wagrad.async_lsgd(optax.sgd(LR), 2, pull=0.0)
  with pytest.raises(TypeError, match="inner"):
    L.lsgd(object(), 2)


# ----------------------------------------------------------------------------- multi-leader


def _multi_tx(r, K, cfg):
  """multi_leader_lsgd with the symbols of np_multi's keyword arguments."""
  return wagrad.multi_leader_lsgd(
      optax.sgd(LR), group_axis=r.group_axis, global_axis=r.global_axis,
      local_period=cfg["lp"], global_period=cfg["gp"], local_pull=cfg["c1"],
      global_pull=cfg["c2"], local_proximal=cfg["p1"], global_proximal=cfg["p2"],
      avg_size=cfg["avg"], num_workers=K)


@pytest.mark.parametrize("backend,K", [("vmap", 8), ("shard_map", 8), ("shard_map", 16)])
def test_multi_leader_matches_numpy(backend, K):
  G = 2
  r = wagrad.Runner(backend, K, groups=G)
  A, b = _util.least_squares(K)
  cfg = dict(lp=2, gp=4, c1=0.3, c2=0.2, p1=0.1, p2=0.2, avg=2)
  tx = _multi_tx(r, K, cfg)

  def step(p, s, A, b):
    loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss)
    sh = s.shared
    return (wagrad.apply_updates(p, u, s), s,
            C.all_gather((sh.leader, sh.global_leader_params, sh.count), r.axis_name))

  f = r.map(step)
  p, s = r.replicate(P0), r.init(tx, P0)
  steps, gleaders, drifts = 9, [], []
  for t in range(steps):
    p, s, gathered = f(p, s, A, b)
    assert_rows_equal(gathered)
    if bool(s.shared.exchanged):
      gleaders.append(int(s.shared.leader))
      drifts.append(float(s.shared.pull_distance))
    gl = np.asarray(s.group_leader)
    if t >= 1:   # every worker of a group holds the same group leader, from its group
      W = K // G
      for gr in range(G):
        assert (gl[gr * W:(gr + 1) * W] == gl[gr * W]).all()
        assert gr * W <= gl[gr * W] < (gr + 1) * W
  drift_ref = []
  x_ref, Lg_ref, gl_ref = np_multi(A, b, np.zeros(3), steps, G=G, drifts=drift_ref, **cfg)
  assert int(s.shared.num_exchanges) == 4 and int(s.shared.num_global_exchanges) == 2
  assert gleaders == gl_ref
  np.testing.assert_allclose(drifts, drift_ref, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(p["w"]), x_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.shared.global_leader_params["w"]), Lg_ref,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["vmap", "shard_map"])
def test_multi_leader_period_schedules_match_numpy(backend):
  K, G, steps = 8, 2, 14
  r = wagrad.Runner(backend, K, groups=G)
  A, b = _util.least_squares(K)
  cfg = dict(lp=lambda t: 2 + t // 8, gp=lambda t: 4 + t // 4, c1=0.3, c2=0.2, p1=0.1,
             p2=0.2, avg=2)
  tx = _multi_tx(r, K, cfg)

  def step(p, s, A, b):
    loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p, s = r.replicate(P0), r.init(tx, P0)
  gleaders = []
  for _ in range(steps):
    p, s = f(p, s, A, b)
    if bool(s.shared.exchanged):
      gleaders.append(int(s.shared.leader))
  x_ref, Lg_ref, gl_ref = np_multi(A, b, np.zeros(3), steps, G=G, **cfg)
  # local rounds end steps 2, 4, 6, 8, 11, 14; global rounds at 4 and 11 (period 4,
  # then 5 and 6 while waiting for a local round)
  assert int(s.shared.num_exchanges) == 6 and int(s.shared.num_global_exchanges) == 2
  assert gleaders == gl_ref and len(gl_ref) == 2
  np.testing.assert_allclose(np.asarray(p["w"]), x_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.shared.global_leader_params["w"]), Lg_ref,
                             rtol=1e-5, atol=1e-6)


def test_multi_leader_with_one_group_is_lsgd():
  K, tau, steps = 8, 3, 9
  A, b = _util.least_squares(K)
  r1 = wagrad.Runner("vmap", K, groups=1)
  tx1 = wagrad.multi_leader_lsgd(optax.sgd(LR), group_axis=r1.group_axis,
                            global_axis=r1.global_axis, local_period=tau, global_period=tau,
                            local_pull=0.0, local_proximal=0.0, global_pull=0.3,
                            global_proximal=0.2, avg_size=tau, num_workers=K)
  r = wagrad.Runner("vmap", K)
  tx = L.lsgd(optax.sgd(LR), tau, pull=0.3, proximal=0.2, num_workers=K)
  f1, f = r1.map(ls_step(tx1, r1.axis_name)), r.map(ls_step(tx, r.axis_name))
  p1, s1 = r1.replicate(P0), r1.init(tx1, P0)
  p, s = r.replicate(P0), r.init(tx, P0)
  for _ in range(steps):
    p1, s1 = f1(p1, s1, A, b)
    p, s = f(p, s, A, b)
    assert int(s1.shared.leader) == int(s.shared.leader)
  np.testing.assert_allclose(np.asarray(p1["w"]), np.asarray(p["w"]), rtol=1e-6, atol=1e-7)
  assert int(s.shared.num_exchanges) == int(s1.shared.num_global_exchanges) == 3


# ----------------------------------------------------------------------------- async


@pytest.mark.parametrize("backend,K", [("vmap", 8), ("shard_map", 8)])
def test_async_lsgd_reconstruction_self_consistency(backend, K):
  """[reconstruction] async LSGD against a NumPy transcription of the same rule."""
  tau, steps = 2, 14
  r = wagrad.Runner(backend, K)
  A, b = _util.least_squares(K)
  active = schedules.speed_schedule(K, steps, [1.0, 0.5, 1.0, 0.34, 1.0, 0.7, 0.5, 1.0],
                                    seed=1)
  reports, anyone = wagrad.schedules.async_report_steps(active, tau)
  tx = wagrad.async_lsgd(optax.sgd(LR), tau, pull=0.4, axis_name=r.axis_name)

  def make(use_table):
    def step(p, s, A, b, a, any_r):
      loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
      u, s = tx.update(g, s, p, value=loss, active=a,
                       any_exchange=any_r.value if use_table else None)
      return optax.apply_updates(p, u), s
    return r.map(step)

  results = []
  for use_table in (False, True):
    f = make(use_table)
    p, s = r.replicate(P0), r.init(tx, P0)
    for t in range(steps):
      w_before = np.asarray(p["w"])
      p, s = f(p, s, A, b, jnp.asarray(active[t]), wagrad.Shared(jnp.asarray(anyone[t])))
      idle = ~active[t]
      assert (np.asarray(p["w"])[idle] == w_before[idle]).all()   # inactive: unchanged
    results.append((np.asarray(p["w"]), s))
  x_ref, L_ref, origin, repl = np_async(A, b, np.zeros(3), active, tau=tau, pull=0.4,
                                        avg=tau)
  for w, s in results:
    assert int(s.shared.num_exchanges) == anyone.sum()
    assert int(s.shared.leader) == origin and int(s.shared.num_replacements) == repl
    np.testing.assert_array_equal(np.asarray(s.local_count), active.sum(0))
    np.testing.assert_allclose(w, x_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.shared.leader_params["w"]), L_ref, rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_array_equal(results[0][0], results[1][0])


@pytest.mark.parametrize("backend", ["vmap", "shard_map", "pmap"])
def test_async_lsgd_period_schedule_matches_numpy(backend):
  K, steps = 8, 16
  r = wagrad.Runner(backend, K)
  A, b = _util.least_squares(K)
  active = schedules.speed_schedule(K, steps, [1.0, 0.5, 1.0, 0.34, 1.0, 0.7, 0.5, 1.0],
                                    seed=1)
  grow = lambda n: 1 + n // 4  # noqa: E731  (own local count -> period)
  np.testing.assert_array_equal(wagrad.schedules.async_report_steps(active, lambda n: 2)[0],
                                wagrad.schedules.async_report_steps(active, 2)[0])
  reports, anyone = wagrad.schedules.async_report_steps(active, grow)
  tx = wagrad.async_lsgd(optax.sgd(LR), grow, pull=0.4, avg_size=2, axis_name=r.axis_name)

  def step(p, s, A, b, a, any_r):
    loss, g = jax.value_and_grad(_util.ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss, active=a, any_exchange=any_r)  # Shared, or plain (l. 584)
    return optax.apply_updates(p, u), s

  f = r.map(step)
  p, s = r.replicate(P0), r.init(tx, P0)
  drifts = []
  for t in range(steps):
    p, s = f(p, s, A, b, jnp.asarray(active[t]), wagrad.Shared(jnp.asarray(anyone[t])))
    if anyone[t]:
      drifts.append(float(s.shared.pull_distance))
  drift_ref = []
  x_ref, L_ref, origin, repl = np_async(A, b, np.zeros(3), active, tau=grow, pull=0.4,
                                        avg=2, drifts=drift_ref)
  np.testing.assert_allclose(drifts, drift_ref, rtol=1e-4)
  assert int(s.shared.num_exchanges) == anyone.sum() > 0
  assert int(s.shared.leader) == origin and int(s.shared.num_replacements) == repl
  np.testing.assert_allclose(np.asarray(p["w"]), x_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.shared.leader_params["w"]), L_ref, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="avg_size"):
    wagrad.async_lsgd(optax.sgd(LR), grow)


# ----------------------------------------------------------------------------- communication


def test_exchange_is_one_param_sized_all_reduce_not_all_gather():
  """lax has no one-to-all broadcast: the leader's parameters travel as ONE
  parameter-sized all-reduce of a one-hot masked tree, plus scalar all-reduces of the
  running losses; nothing parameter-sized is all-gathered."""
  K, d = 8, 257
  r = wagrad.Runner("shard_map", K)
  rng = np.random.default_rng(0)
  A = rng.normal(size=(K, 4, d)).astype(np.float32)
  b = rng.normal(size=(K, 4)).astype(np.float32)
  p0 = {"w": jnp.zeros(d, jnp.float32)}
  tx = L.lsgd(optax.sgd(LR), 4, proximal=0.1, num_workers=K)
  step = r.map(ls_step(tx, r.axis_name))
  hlo = step.lower(r.replicate(p0), r.init(tx, p0), A, b).compile().as_text()
  lines = [ln for ln in hlo.splitlines() if re.search(r"\ball-reduce(-start)?\(", ln)]
  gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", ln)]
  big = [ln for ln in lines if f"[{d}]" in ln.split("all-reduce")[0]]
  assert len(big) == 1, big
  assert "cond/branch_1_fun" in big[0]          # inside the exchange branch only
  assert not [ln for ln in gathers if str(d) in ln]
  # the election (with the drift metric) is one all-gather of K rows of 3 floats
  assert len(gathers) == 1 and "f32[8,3]" in gathers[0], gathers
  # any other all-reduce is a scalar
  for ln in lines:
    if ln not in big:
      shapes = re.findall(r"[fsu]\d+\[([\d,]*)\]", ln.split("all-reduce")[0])
      assert all(sh == "" for sh in shapes), ln
  # and it runs only on exchange steps: 8 steps with tau=4 -> 2 exchanges
  p, s = r.replicate(p0), r.init(tx, p0)
  for _ in range(8):
    p, s = step(p, s, A, b)
  assert int(s.shared.num_exchanges) == 2


# ----------------------------------------------------------------------------- convergence


@pytest.mark.slow
def test_lsgd_digits_convergence():
  (Xtr, ytr), (Xte, yte) = _util.digits()
  K, steps, batch = 8, 200, 32
  r = wagrad.Runner("vmap", K)
  Xs, ys = r.shard(Xtr, ytr)
  key = jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  p0 = {"w1": jax.random.normal(k1, (64, 32)) * 0.18, "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 10)) * 0.18, "b2": jnp.zeros(10)}

  def logits(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  tx = L.lsgd(optax.sgd(0.1, momentum=0.9, nesterov=True), 4, num_workers=K)

  def one(carry, xy):
    p, s = carry
    loss, g = jax.value_and_grad(loss_fn)(p, *xy)
    u, s = tx.update(g, s, p, value=loss)
    return (wagrad.apply_updates(p, u, s), s), loss

  def steps_of(p, s, x, y):   # `chunk` steps per call (x: [chunk, batch, 64])
    return jax.lax.scan(one, (p, s), (x, y))[0]

  f = r.map(steps_of)
  p, s = r.replicate(p0), r.init(tx, p0)
  rng = np.random.default_rng(0)
  n, chunk = Xs.shape[1], 10
  for _ in range(steps // chunk):
    idx = rng.integers(0, n, size=(K, chunk * batch))
    xb = np.take_along_axis(Xs, idx[..., None], 1).reshape(K, chunk, batch, 64)
    yb = np.take_along_axis(ys, idx, 1).reshape(K, chunk, batch)
    p, s = f(p, s, xb, yb)
  assert int(s.shared.num_exchanges) == steps // 4
  acc = lambda q: float(jnp.mean(jnp.argmax(logits(q, Xte), -1) == yte))
  acc_leader = acc(s.shared.leader_params)
  acc_avg = acc(jax.tree_util.tree_map(lambda x: x.mean(0), p))
  print(f"digits LSGD: leader {acc_leader:.3f}, average {acc_avg:.3f}")
  assert acc_leader > 0.9 and acc_avg > 0.9
