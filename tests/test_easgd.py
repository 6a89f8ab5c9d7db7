"""Tests of the EASGD family (EASGD, EAMSGD, async EASGD, tree EASGD) and DOWNPOUR.

Every rule is checked step by step against an independent float64 NumPy implementation
of the equations in the docstrings and docs/algorithms.md, on every backend.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from jax import lax

import wagrad
from wagrad._src import collectives as C
from wagrad._src import easgd as E
from wagrad._src import schedules
from wagrad._src import simulated_async as SA

from _util import BACKENDS, BACKEND_IDS, least_squares, ls_grad_np, ls_loss

RTOL, ATOL = 1e-5, 1e-6
STEPS = 7
ETA = 0.1


def _problem(K, seed=0):
  A, b = least_squares(K, seed=seed)
  rng = np.random.default_rng(seed + 1)
  w0 = rng.normal(size=(K, 3)).astype(np.float32)       # workers start apart
  c0 = np.asarray([0.3, -0.2, 0.1], np.float32)          # the center's start
  return A, b, w0, c0


def _grads_np(x, A, b):
  return np.stack([ls_grad_np(x[i], A[i], b[i]) for i in range(len(x))])


def _shared_equal(state, axis_name):
  """True iff every leaf of every shared node is identical on all workers."""
  leaves = jax.tree_util.tree_leaves(
      [n for n in jax.tree_util.tree_leaves(state, is_leaf=wagrad._src.base.is_shared)
       if wagrad._src.base.is_shared(n)])
  return jnp.all(jnp.stack([jnp.all(C.all_equal(x, axis_name)) for x in leaves]))


def _loop(runner, tx, step_body, params, data, steps, rows=()):
  """Run ``steps`` steps of ``step_body`` inside one mapped call (a ``lax.scan``).

  One program per test keeps compile time low on every backend. ``rows`` are per-step
  arguments: per-worker arrays ``[K, T, ...]`` or ``wagrad.Shared`` arrays ``[T, ...]``.
  """
  nd = len(data)

  def multi(p, s, *args):
    data_args, row_args = args[:nd], args[nd:]

    def one(carry, t):
      p, s, ok = carry
      row = tuple(jax.tree_util.tree_map(lambda x: x[t], r) for r in row_args)
      p, s, ok1 = step_body(p, s, *data_args, *row)
      return (p, s, ok & ok1), None

    (p, s, ok), _ = lax.scan(one, (p, s, jnp.bool_(True)), jnp.arange(steps))
    return p, s, ok

  s = runner.init(tx, {"w": jnp.asarray(params["c0"])})
  p = runner.put({"w": jnp.asarray(params["w0"])})
  p, s, ok = runner.map(multi)(p, s, *data, *rows)
  assert np.all(np.asarray(ok)), "shared state differs between workers"
  return p, s


def _assert_close(actual, desired):
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- EASGD


def easgd_np(A, b, w0, c0, steps, tau, alpha, eta=ETA):
  x, c = w0.astype(np.float64), c0.astype(np.float64)
  n = 0
  for t in range(steps):
    u = -eta * _grads_np(x, A, b)
    if (t + 1) % tau == 0:
      d = x - c                                   # pre-step x_i and x~
      x = x + u - alpha * d
      c = c + alpha * d.sum(0)
      n += 1
    else:
      x = x + u
  return x, c, n


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_easgd_matches_numpy(backend, K):
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  tau = 3
  tx = E.easgd(optax.sgd(ETA), tau, beta=0.9, axis_name=runner.axis_name)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), STEPS)
  x, c, n = easgd_np(A, b, w0, c0, STEPS, tau, 0.9 / K)
  _assert_close(p["w"], x)
  _assert_close(E.easgd_center(s)["w"], c)
  assert int(s.shared.num_exchanges) == n == 2            # steps 2 and 5 (0-based)
  assert int(s.shared.last_exchange) == 6
  # distance: mean squared distance to the center before the last exchange
  assert float(s.shared.distance) > 0


def test_easgd_warmup_and_outer_sgd1_is_plain():
  """Warm-up end takes worker 0's params exactly (center too); outer sgd(1) == plain."""
  K = 8
  runner = wagrad.Runner("vmap", K)
  A, b, w0, c0 = _problem(K)
  tau, warm, alpha = 3, 2, 0.1
  txs = [E.easgd(optax.sgd(ETA), tau, alpha=alpha, warmup_steps=warm),
         E.easgd(optax.sgd(ETA), tau, alpha=alpha, warmup_steps=warm,
                 outer_optimizer=optax.sgd(1.0))]
  outs = []
  for tx in txs:
    def step(p, s, A, b, tx=tx):
      g = jax.grad(ls_loss)(p, A, b)
      u, s = tx.update(g, s, p)
      return wagrad.apply_updates(p, u, s), s, _shared_equal(s, "workers")
    outs.append(_loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), 8))
  # NumPy: synchronous SGD for 2 steps, then everyone (and the center) = worker 0
  x = w0.astype(np.float64)
  for t in range(warm):
    x = x - ETA * _grads_np(x, A, b).mean(0)
  x[:] = x[0]
  c = x[0].copy()
  last = warm
  for t in range(warm, 8):
    u = -ETA * _grads_np(x, A, b)
    if t + 1 - last >= tau:
      d = x - c
      x, c, last = x + u - alpha * d, c + alpha * d.sum(0), t + 1
    else:
      x = x + u
  for p, s in outs:
    _assert_close(p["w"], x)
    _assert_close(s.shared.center["w"], c)
    assert int(s.shared.num_exchanges) == 3     # warm-up end (step 1), steps 4 and 7
  np.testing.assert_allclose(outs[0][0]["w"], outs[1][0]["w"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("poison_value", [np.nan, np.inf, -np.inf])
def test_easgd_nonfinite_worker_excluded_and_reset(poison_value):
  K, bad = 8, 3
  runner = wagrad.Runner("vmap", K)
  A, b, w0, c0 = _problem(K)
  alpha = 0.1
  tx = E.easgd(optax.sgd(ETA), 1, alpha=alpha)
  poison = np.zeros(K, bool)
  poison[bad] = True

  def step(p, s, A, b, poison):
    g = jax.grad(ls_loss)(p, A, b)
    g = jax.tree_util.tree_map(lambda x: jnp.where(poison, poison_value, x), g)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, "workers")

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b, poison), 1)
  x, c = w0.astype(np.float64), c0.astype(np.float64)
  d = x - c
  u = -ETA * _grads_np(x, A, b)
  good = ~poison
  c_new = c + alpha * d[good].sum(0)
  x_new = x + u - alpha * d
  x_new[bad] = c_new                                    # reset to the new center
  assert np.all(np.isfinite(np.asarray(p["w"])))
  _assert_close(s.shared.center["w"], c_new)
  _assert_close(p["w"], x_new)


# ----------------------------------------------------------------------------- stability


def _full_matrix(eta_h, alpha, p):
  """Iteration matrix of (x_1..x_p, x~) for f = h x^2 / 2, tau = 1, deterministic."""
  M = np.zeros((p + 1, p + 1))
  for i in range(p):
    M[i, i] = 1 - eta_h - alpha
    M[i, p] = alpha
    M[p, i] = alpha
  M[p, p] = 1 - p * alpha
  return M


def _derived_stable(eta_h, alpha, beta):
  """The [derived] stability conditions of docs/algorithms.md (EASGD)."""
  return (eta_h * beta > 0 and (2 - eta_h) * (2 - beta) > 2 * alpha
          and abs((1 - eta_h - alpha) * (1 - beta) - alpha * beta) < 1
          and abs(1 - eta_h - alpha) < 1)


def test_stability_conditions_match_spectral_radius():
  rng = np.random.default_rng(0)
  p = 4
  agree = 0
  for _ in range(2000):
    eta_h, alpha = rng.uniform(0, 2.5), rng.uniform(0, 1 / p)
    rho = np.max(np.abs(np.linalg.eigvals(_full_matrix(eta_h, alpha, p))))
    if abs(rho - 1) < 1e-6:
      continue
    agree += (rho < 1) == _derived_stable(eta_h, alpha, p * alpha)
  assert agree >= 1990


@pytest.mark.parametrize("eta,alpha,stable", [(0.5, 0.2, True), (1.9, 0.2, False)])
def test_stability_both_sides(eta, alpha, stable):
  """eta h = 1.9 alone is stable for gradient descent; with alpha = 0.2 (beta = 0.8,
  p = 4) the elastic coupling makes EASGD diverge."""
  p, h = 4, 1.0
  rho = np.max(np.abs(np.linalg.eigvals(_full_matrix(eta * h, alpha, p))))
  assert (rho < 1) == stable == _derived_stable(eta * h, alpha, p * alpha)
  assert abs(1 - eta * h) < 1                              # plain GD converges
  runner = wagrad.Runner("vmap", p)
  tx = E.easgd(optax.sgd(eta), 1, alpha=alpha)

  def steps(x, s):
    def one(carry, _):
      x, s = carry
      u, s = tx.update({"w": h * x["w"]}, s, x)
      return (wagrad.apply_updates(x, u, s), s), None
    return lax.scan(one, (x, s), None, length=60)[0]

  x = {"w": jnp.asarray(np.linspace(-1, 1, p)[:, None], jnp.float32)}
  s = runner.init(tx, {"w": jnp.ones((1,), jnp.float32)})
  x, s = runner.map(steps)(x, s)
  size = max(np.max(np.abs(np.asarray(x["w"]))), np.max(np.abs(np.asarray(s.shared.center["w"]))))
  # |state| ~ rho^60 times the start
  if stable:
    assert size < 1e-3
  else:
    assert size > 1e3


# ----------------------------------------------------------------------------- EAMSGD


def eamsgd_np(A, b, w0, c0, steps, tau, alpha, delta, eta):
  x, c = w0.astype(np.float64), c0.astype(np.float64)
  v = np.zeros_like(x)
  for t in range(steps):
    g = _grads_np(x + delta * v, A, b)                  # look-ahead of the pre-elastic x
    v = delta * v - eta * g
    if (t + 1) % tau == 0:
      d = x - c
      x = x + v - alpha * d
      c = c + alpha * d.sum(0)
    else:
      x = x + v
  return x, c


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_eamsgd_matches_numpy(backend, K):
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  tau, delta, eta = 2, 0.9, 0.05
  tx = E.eamsgd(optax.sgd(eta), tau, momentum=delta, beta=0.9, axis_name=runner.axis_name)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(E.eamsgd_lookahead(p, s), A, b)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), STEPS)
  x, c = eamsgd_np(A, b, w0, c0, STEPS, tau, 0.9 / K, delta, eta)
  _assert_close(p["w"], x)
  _assert_close(E.easgd_center(s)["w"], c)
  assert int(s.shared.num_exchanges) == 3


def test_eamsgd_without_momentum_is_easgd():
  K = 8
  runner = wagrad.Runner("vmap", K)
  A, b, w0, c0 = _problem(K)
  res = []
  for tx in (E.eamsgd(optax.sgd(ETA), 2, momentum=0.0, alpha=0.05),
             E.easgd(optax.sgd(ETA), 2, alpha=0.05)):
    def step(p, s, A, b, tx=tx):
      g = jax.grad(ls_loss)(p, A, b)
      u, s = tx.update(g, s, p)
      return wagrad.apply_updates(p, u, s), s, jnp.bool_(True)
    p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), 5)
    res.append((np.asarray(p["w"]), np.asarray(s.shared.center["w"])))
  np.testing.assert_allclose(res[0][0], res[1][0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(res[0][1], res[1][1], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- async EASGD


def async_easgd_np(A, b, w0, c0, active, tau, alpha, order, eta=ETA):
  """``tau``: an int (exchange when the own clock is a multiple) or a schedule (at clock
  0, then period(clock) own steps after each exchange)."""
  x, c = w0.astype(np.float64), c0.astype(np.float64)
  K = len(x)
  clock = np.zeros(K, int)
  due = np.zeros(K, int)
  n = 0
  for t in range(len(active)):
    u = -eta * _grads_np(x, A, b)
    new = x.copy()
    c_start = c.copy()
    for i in range(K):                                     # master: ascending index
      if not active[t, i]:
        continue
      fires = clock[i] == due[i] if callable(tau) else clock[i] % tau == 0
      if fires:
        if callable(tau):
          due[i] = clock[i] + max(1, int(tau(clock[i])))
        seen = c if order == "sequential" else c_start
        e = alpha * (x[i] - seen)
        c = c + e
        new[i] = x[i] + u[i] - e
        n += 1
      else:
        new[i] = x[i] + u[i]
    x = new
    clock += active[t]
  return x, c, clock, n


@pytest.mark.parametrize("order", SA.ORDERS)
@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_async_easgd_matches_numpy(backend, K, order):
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  tau, T, alpha = 2, 8, 0.15
  speeds = np.linspace(1.0, 0.3, K)
  active = schedules.speed_schedule(K, T, speeds, seed=1)
  exch, anyx = wagrad.schedules.async_easgd_schedule(active, tau)
  assert exch[active.argmax(0), np.arange(K)].all()      # first active step exchanges
  tx = wagrad.async_easgd(optax.sgd(ETA), tau, alpha=alpha, order=order,
                     axis_name=runner.axis_name)
  use_table = order == "sequential"       # the other order decides by pmax instead

  def step(p, s, A, b, act, flag):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, active=act, any_exchange=flag.value if use_table else None)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  rows = (active.T.copy(), wagrad.Shared(jnp.asarray(anyx)))
  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), T, rows)
  x, c, clock, n = async_easgd_np(A, b, w0, c0, active, tau, alpha, order)
  _assert_close(p["w"], x)
  _assert_close(s.shared.center["w"], c)
  np.testing.assert_array_equal(np.asarray(s.clock), clock)
  assert int(s.shared.num_exchanges) == n == int(exch.sum())
  assert int(s.shared.last_exchange) == int(np.nonzero(anyx)[0][-1]) + 1


@pytest.mark.parametrize("backend", ["vmap", "shard_map", "pmap"])
def test_async_easgd_period_schedule_matches_numpy(backend):
  K, T, alpha = 8, 14, 0.15
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  active = schedules.speed_schedule(K, T, np.linspace(1.0, 0.4, K), seed=2)
  grow = lambda c: 1 + c // 3  # noqa: E731  (own clock -> period)
  # a constant schedule gives the integer period's table
  np.testing.assert_array_equal(wagrad.schedules.async_easgd_schedule(active, lambda c: 3)[0],
                                wagrad.schedules.async_easgd_schedule(active, 3)[0])
  exch, anyx = wagrad.schedules.async_easgd_schedule(active, grow)
  tx = wagrad.async_easgd(optax.sgd(ETA), grow, alpha=alpha, axis_name=runner.axis_name)

  def step(p, s, A, b, act, flag):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, active=act, any_exchange=flag)  # Shared, or plain (l. 350)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  rows = (active.T.copy(), wagrad.Shared(jnp.asarray(anyx)))
  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), T, rows)
  x, c, clock, n = async_easgd_np(A, b, w0, c0, active, grow, alpha, "sequential")
  _assert_close(p["w"], x)
  _assert_close(s.shared.center["w"], c)
  assert int(s.shared.num_exchanges) == n == int(exch.sum())
  assert n < int(wagrad.schedules.async_easgd_schedule(active, 1)[0].sum())  # the period grew


def test_async_easgd_orders_differ_and_inactive_unchanged():
  K = 4
  runner = wagrad.Runner("vmap", K)
  A, b, w0, c0 = _problem(K)
  active = np.array([[True, True, False, True]])
  out = {}
  for order in SA.ORDERS:
    tx = wagrad.async_easgd(optax.sgd(ETA, momentum=0.9), 1, alpha=0.3, order=order)

    def step(p, s, A, b, act, tx=tx):
      g = jax.grad(ls_loss)(p, A, b)
      u, s = tx.update(g, s, p, active=act)
      return wagrad.apply_updates(p, u, s), s, jnp.bool_(True)

    s0 = runner.init(tx, {"w": jnp.asarray(c0)})
    p, s, _ = runner.map(step)({"w": jnp.asarray(w0)}, s0, A, b, active[0])
    out[order] = np.asarray(s.shared.center["w"])
    np.testing.assert_array_equal(np.asarray(p["w"])[2], w0[2])     # inactive: unchanged
    np.testing.assert_array_equal(np.asarray(s.inner[0].trace["w"])[2], 0.0)
    np.testing.assert_array_equal(np.asarray(s.clock), [1, 1, 0, 1])
  assert np.abs(out["sequential"] - out["simultaneous"]).max() > 1e-3


# ----------------------------------------------------------------------------- tree EASGD


# pmap runs one mesh axis, so only layouts with groups a multiple of the devices
TREE_LAYOUTS = [("vmap", 8, 2), ("vmap", 8, 4), ("shard_map", 8, 2), ("shard_map", 16, 2),
                ("pmap", 16, 8)]


def tree_np(A, b, w0, c0, steps, G, taus, alphas, eta=ETA, warmup=0):
  """Tree EASGD in float64; ``taus`` = (low, high), each an integer or a schedule
  t -> period (a level exchanges once that many steps passed since its last one).
  ``warmup``: that many steps of synchronous SGD (the workers' mean gradient) first,
  then every worker, group center and the root take worker 0's parameters."""
  fns = [tau if callable(tau) else (lambda t, tau=tau: tau) for tau in taus]
  last = [warmup, warmup]
  x, r = w0.astype(np.float64), c0.astype(np.float64)
  K = len(x)
  W = K // G
  grp = np.arange(K) // W
  z = np.tile(r, (G, 1))
  for t in range(warmup):
    x = x - eta * _grads_np(x, A, b).mean(0)
  if warmup:
    x, z, r = np.tile(x[0], (K, 1)), np.tile(x[0], (G, 1)), x[0].copy()
  for t in range(warmup, steps):
    u = -eta * _grads_np(x, A, b)
    low, high = (t + 1 - last[0] >= fns[0](t)), (t + 1 - last[1] >= fns[1](t))
    last = [t + 1 if low else last[0], t + 1 if high else last[1]]
    zinc = np.zeros_like(z)
    if low:
      d = x - z[grp]
      x = x + u - alphas[0] * d
      for g in range(G):
        zinc[g] += alphas[0] * d[grp == g].sum(0)
    else:
      x = x + u
    if high:
      dz = z - r
      zinc -= alphas[1] * dz
      r = r + alphas[1] * dz.sum(0)
    z = z + zinc
  return x, z[grp], r


@pytest.mark.parametrize("backend,K,G", TREE_LAYOUTS,
                         ids=[f"{b}-K{k}-G{g}" for b, k, g in TREE_LAYOUTS])
def test_tree_easgd_matches_numpy(backend, K, G):
  runner = wagrad.Runner(backend, K, groups=G)
  A, b, w0, c0 = _problem(K)
  taus = (2, 3)
  tx = wagrad.tree_easgd(optax.sgd(ETA), group_axis=runner.group_axis,
                    global_axis=runner.global_axis, sync_period=taus)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    same_in_group = jnp.all(C.all_equal(s.group_center["w"], runner.group_axis))
    return (wagrad.apply_updates(p, u, s), s,
            _shared_equal(s, runner.axis_name) & same_in_group)

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), STEPS)
  W = K // G
  x, z, r = tree_np(A, b, w0, c0, STEPS, G, taus, (0.9 / W, 0.9 / G))
  _assert_close(p["w"], x)
  _assert_close(s.group_center["w"], z)
  _assert_close(E.easgd_center(s)["w"], r)
  assert int(s.shared.num_exchanges) == 3 and int(s.shared.num_root_exchanges) == 2


@pytest.mark.parametrize("backend,K,G", [("vmap", 8, 2), ("shard_map", 16, 2)])
def test_tree_easgd_warmup_matches_numpy(backend, K, G):
  """warmup_steps: synchronous SGD, then every worker, group center and the root at
  worker 0's parameters (exactly), and the periods count from there."""
  runner = wagrad.Runner(backend, K, groups=G)
  A, b, w0, c0 = _problem(K)
  taus, warmup = (2, 3), 3
  tx = wagrad.tree_easgd(optax.sgd(ETA), group_axis=runner.group_axis,
                         global_axis=runner.global_axis, sync_period=taus,
                         warmup_steps=warmup)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), warmup)
  x = np.asarray(p["w"])
  assert (x == x[0]).all() and (np.asarray(s.group_center["w"]) == x[0]).all()
  assert (np.asarray(E.easgd_center(s)["w"]) == x[0]).all()  # bit-exact
  f = runner.map(step)
  for _ in range(STEPS - warmup):
    p, s, ok = f(p, s, A, b)
    assert bool(np.all(ok))
  x, z, r = tree_np(A, b, w0, c0, STEPS, G, taus, (0.9 / (K // G), 0.9 / G), warmup=warmup)
  _assert_close(p["w"], x)
  _assert_close(s.group_center["w"], z)
  _assert_close(E.easgd_center(s)["w"], r)


@pytest.mark.parametrize("policy", ["average", "reset"])
def test_tree_easgd_opt_state_policy_at_group_exchanges(policy):
  """At a group-level exchange the inner state is averaged over the group ("average":
  equal within a group, different across groups) or restarted ("reset": zero momentum)."""
  K, G = 8, 2
  runner = wagrad.Runner("vmap", K, groups=G)
  A, b, w0, c0 = _problem(K)
  tx = wagrad.tree_easgd(optax.sgd(ETA, momentum=0.9), group_axis=runner.group_axis,
                         global_axis=runner.global_axis, sync_period=(2, 100),
                         opt_state_sync=policy)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, jnp.bool_(True)

  f = runner.map(step)
  p, s = runner.replicate({"w": jnp.asarray(c0)}), runner.init(tx, {"w": jnp.asarray(c0)})
  p = {"w": jnp.asarray(w0)}
  p, s, _ = f(p, s, A, b)
  trace = np.asarray(s.inner[0].trace["w"])
  assert len({tuple(r) for r in trace}) == K  # a local step: every worker its own
  p, s, _ = f(p, s, A, b)  # the group-level exchange
  trace = np.asarray(s.inner[0].trace["w"]).reshape(G, K // G, -1)
  if policy == "reset":
    assert (trace == 0).all()
  else:
    assert (trace == trace[:, :1]).all() and not (trace[0, 0] == trace[1, 0]).all()


@pytest.mark.parametrize("backend,K,G", [("vmap", 8, 2), ("shard_map", 8, 2), ("pmap", 16, 8)])
def test_tree_easgd_period_schedules_match_numpy(backend, K, G):
  steps = 12
  runner = wagrad.Runner(backend, K, groups=G)
  A, b, w0, c0 = _problem(K)
  taus = (lambda t: 1 + t // 4, lambda t: 3 + t // 6)
  tx = wagrad.tree_easgd(optax.sgd(ETA), group_axis=runner.group_axis,
                    global_axis=runner.global_axis, sync_period=taus)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), steps)
  x, z, r = tree_np(A, b, w0, c0, steps, G, taus, (0.9 / (K // G), 0.9 / G))
  _assert_close(p["w"], x)
  _assert_close(s.group_center["w"], z)
  _assert_close(E.easgd_center(s)["w"], r)
  # low: ends of steps 1, 2, 3, 4, 6, 8, 11 (period 1, then 2, then 3 from step 9)
  # high: 3, 6, 10 (period 3, then 4 from step 7)
  assert int(s.shared.num_exchanges) == 7 and int(s.shared.num_root_exchanges) == 3


# ----------------------------------------------------------------------------- DOWNPOUR


def downpour_np(A, b, w0, c0, steps, tau, mu, eta=ETA):
  x, xm = w0.astype(np.float64), c0.astype(np.float64)
  acc, m = np.zeros_like(x), np.zeros_like(xm)
  for t in range(steps):
    u = -eta * _grads_np(x, A, b)
    acc += u
    x = x + u
    if (t + 1) % tau == 0:
      m = mu * m + acc.sum(0)
      xm = xm + m
      x[:] = xm
      acc[:] = 0
  return x, xm


DOWNPOUR_CASES = [(b, k, 0.5) for b, k in BACKENDS] + [("vmap", 8, 0.0)]


@pytest.mark.parametrize("backend,K,mu", DOWNPOUR_CASES,
                         ids=[f"{b}-K{k}-mu{m}" for b, k, m in DOWNPOUR_CASES])
def test_downpour_matches_numpy(backend, K, mu):
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  tau, eta = 3, 0.02
  tx = wagrad.downpour(eta, tau, axis_name=runner.axis_name, master_momentum=mu)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), STEPS)
  x, xm = downpour_np(A, b, w0, c0, STEPS, tau, mu, eta)
  _assert_close(p["w"], x)
  _assert_close(E.easgd_center(s)["w"], xm)
  assert int(s.shared.num_exchanges) == 2
  # right after the exchange at step 5 every worker held the master exactly; the
  # last step (6) is local again
  assert not bool(s.shared.assign)


def async_downpour_np(A, b, w0, c0, active, tau, mu, eta):
  """Own clocks: worker i pushes after every tau-th of its active steps; the pushes of
  one step are added together (m <- mu m + sum, x_M <- x_M + m) and only the pushers
  take x_M."""
  x, xm = w0.astype(np.float64), c0.astype(np.float64)
  acc, m = np.zeros_like(x), np.zeros_like(xm)
  own = np.zeros(len(x), int)
  for t in range(len(active)):
    act = active[t]
    u = -eta * _grads_np(x, A, b) * act[:, None]
    acc += u
    x = x + u
    own += act
    push = act & (own % tau == 0)
    if push.any():
      m = mu * m + acc[push].sum(0)
      xm = xm + m
      x[push] = xm
      acc[push] = 0
  return x, xm


ASYNC_DOWNPOUR_CASES = [(b, k, 0.5) for b, k in BACKENDS] + [("vmap", 8, 0.0)]


@pytest.mark.parametrize("backend,K,mu", ASYNC_DOWNPOUR_CASES,
                         ids=[f"{b}-K{k}-mu{m}" for b, k, m in ASYNC_DOWNPOUR_CASES])
def test_async_downpour_matches_numpy(backend, K, mu):
  """asynchronous=True: workers at their own speeds push on their own clocks."""
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  tau, eta, T = 2, 0.02, 9
  active = schedules.speed_schedule(K, T, np.linspace(1.0, 0.4, K), seed=2)
  tx = wagrad.downpour(eta, tau, axis_name=runner.axis_name, master_momentum=mu,
                       asynchronous=True)

  def step(p, s, A, b, act, any_exchange=None):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, active=act, any_exchange=any_exchange)
    return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)

  x, xm = async_downpour_np(A, b, w0, c0, active, tau, mu, eta)
  # whether anyone pushes: a pmax of the workers' flags, or the precomputed table
  _, anyone = wagrad.schedules.async_report_steps(active, tau)
  assert anyone.any() and not anyone.all()
  for rows in ((active.T.copy(),), (active.T.copy(), wagrad.Shared(jnp.asarray(anyone)))):
    p, s = _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), T, rows=rows)
    _assert_close(p["w"], x)
    _assert_close(E.easgd_center(s)["w"], xm)
    own = active.sum(0)
    assert np.array_equal(np.asarray(s.own_steps), own) and len(set(own)) > 1
  sync, z = wagrad.downpour(eta, tau), {"w": jnp.zeros(3)}
  with pytest.raises(TypeError, match="asynchronous=True"):
    sync.update(z, sync.init(z), z, active=True)
  with pytest.raises(TypeError, match="any_exchange.*asynchronous=True"):
    sync.update(z, sync.init(z), z, any_exchange=True)
  with pytest.raises(TypeError, match="one shared flag.*async_report_steps"):
    runner.map(lambda p, s, A, b, act: step(p, s, A, b, act, jnp.ones(3, bool)))(
        runner.put({"w": jnp.asarray(w0)}), runner.init(tx, {"w": jnp.asarray(c0)}), A, b,
        jnp.asarray(active[0]))
  with pytest.raises(ValueError, match="asynchronous=True"):
    wagrad.downpour(eta, lambda t: 4, asynchronous=True)


def test_async_downpour_any_exchange_runs_no_collective_between_pushes():
  """With the precomputed shared ``any_exchange=`` flag, the compiled shard_map step has no
  all-reduce outside the push branch; by default a scalar pmax runs every step."""
  runner = wagrad.Runner("shard_map", 8)
  tx = wagrad.downpour(0.02, 2, axis_name=runner.axis_name, asynchronous=True)
  A, b, w0, c0 = _problem(8)
  p, s = runner.put({"w": jnp.asarray(w0)}), runner.init(tx, {"w": jnp.asarray(c0)})
  act = jnp.ones(8, bool)

  def entry_ops(use_flag):
    def step(p, s, A, b, act, anyone):
      u, s = tx.update(jax.grad(ls_loss)(p, A, b), s, p, active=act,
                       any_exchange=anyone if use_flag else None)
      return wagrad.apply_updates(p, u, s), s
    hlo = runner.map(step).lower(p, s, A, b, act, wagrad.Shared(jnp.bool_(True))
                                 ).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    return entry[: entry.index("\n}")], hlo

  entry, hlo = entry_ops(True)
  assert "all-reduce" not in entry and "conditional" in entry and "all-reduce" in hlo
  assert "all-reduce" in entry_ops(False)[0]


def _due_steps(period_fn, steps):
  """1-based ends of the exchange steps of a schedule (a period since the last one)."""
  out, last = [], 0
  for t in range(steps):
    if t + 1 - last >= period_fn(t):
      out.append(t + 1)
      last = t + 1
  return out


@pytest.mark.parametrize("name,backend", [("eamsgd", "vmap"), ("downpour", "vmap"),
                                          ("eamsgd", "pmap"), ("downpour", "shard_map")])
def test_momentum_and_downpour_take_period_schedules(name, backend):
  """A constant schedule is the integer period bit for bit; a growing one exchanges at
  the steps its periods give."""
  K, steps = 8, 12
  runner = wagrad.Runner(backend, K)
  A, b, w0, c0 = _problem(K)
  make = {"eamsgd": lambda tau: E.eamsgd(optax.sgd(0.05), tau, momentum=0.9),
          "downpour": lambda tau: wagrad.downpour(0.02, tau, master_momentum=0.5)}[name]

  def run(tau):
    tx = make(tau)

    def step(p, s, A, b):
      at = E.eamsgd_lookahead(p, s) if name == "eamsgd" else p
      u, s = tx.update(jax.grad(ls_loss)(at, A, b), s, p)
      return wagrad.apply_updates(p, u, s), s, _shared_equal(s, runner.axis_name)
    return _loop(runner, tx, step, {"w0": w0, "c0": c0}, (A, b), steps)

  p_int, s_int = run(3)
  p_const, s_const = run(lambda t: 3)
  np.testing.assert_array_equal(np.asarray(p_int["w"]), np.asarray(p_const["w"]))
  np.testing.assert_array_equal(np.asarray(E.easgd_center(s_int)["w"]),
                                np.asarray(E.easgd_center(s_const)["w"]))
  grow = lambda t: 2 + t // 5  # noqa: E731
  _, s = run(grow)
  assert int(s.shared.num_exchanges) == len(_due_steps(grow, steps)) == 4


# ----------------------------------------------------------------------------- errors


def test_bad_hyperparameters():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="alpha"):
    E.easgd(sgd, 1, alpha=1.0)
  with pytest.raises(ValueError, match="alpha"):
    E.easgd(sgd, 1, alpha=0.0)
  with pytest.raises(ValueError, match="beta"):
    E.easgd(sgd, 1, beta=1.5)
  with pytest.raises(ValueError, match="beta"):
    E.easgd(sgd, 1, beta=0.0)
  with pytest.raises(ValueError, match="sync_period"):
    E.easgd(sgd, 0)
  with pytest.raises(ValueError, match="warmup_steps"):
    E.easgd(sgd, 1, warmup_steps=-1)
  with pytest.raises(ValueError, match="opt_state_sync"):
    E.easgd(sgd, 1, opt_state_sync="nope")
  with pytest.raises(TypeError, match="inner"):
    E.easgd("sgd", 1)
  with pytest.raises(TypeError, match="outer_optimizer"):
    E.easgd(sgd, 1, outer_optimizer=3)
  with pytest.raises(ValueError, match="momentum"):
    E.eamsgd(sgd, 1, momentum=1.0)
  with pytest.raises(ValueError, match="momentum"):
    E.eamsgd(sgd, 1, momentum=-0.1)
  with pytest.raises(TypeError, match=r"inner optimizer first.*wagrad\.eamsgd\(optax\.sgd"):
    E.eamsgd(0.1, 1)  # the 0.1 convention: the message names the inner optimizer
  with pytest.raises(ValueError, match="order"):
    wagrad.async_easgd(sgd, 2, order="random")
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.async_easgd(sgd, 0)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.tree_easgd(sgd, group_axis="l", global_axis="g", sync_period=(2,))
  with pytest.raises(ValueError, match=r"sync_period\[low\]"):
    wagrad.tree_easgd(sgd, group_axis="l", global_axis="g", sync_period=(None, 4))
  with pytest.raises(ValueError, match=r"sync_period\[high\]"):
    wagrad.tree_easgd(sgd, group_axis="l", global_axis="g", sync_period=(2, lambda t: 0))
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.async_easgd(sgd, lambda c: -1)
  with pytest.raises(ValueError, match="alpha"):
    wagrad.tree_easgd(sgd, group_axis="l", global_axis="g", alpha=(0.1, 1.2))
  with pytest.raises(TypeError, match="group_axis"):
    wagrad.tree_easgd(sgd, group_axis=None, global_axis="g")
  with pytest.raises(ValueError, match="master_momentum"):
    wagrad.downpour(0.1, 2, master_momentum=1.0)
  with pytest.raises(ValueError, match="learning_rate"):
    wagrad.downpour(0.0, 2)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.schedules.async_easgd_schedule(np.ones((3, 2), bool), 0)
  # beta / p not in (0, 1): one worker with beta = 1 -> alpha = 1
  tx = E.easgd(sgd, 1, beta=1.0)
  f = jax.vmap(lambda p, s: tx.update(p, s, p), in_axes=(0, None), axis_name="workers")
  with pytest.raises(ValueError, match="alpha"):
    f(jnp.ones((1, 2)), tx.init(jnp.ones(2)))
  # axis not bound
  with pytest.raises(ValueError, match="axis_name"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
  with pytest.raises(TypeError, match="eamsgd"):
    E.eamsgd_lookahead({"w": 1.0}, tx.init(jnp.ones(2)))


# ----------------------------------------------------------------------------- convergence


def _mlp_init(key, sizes=(64, 32, 10)):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)})
  return params


def _mlp(params, X):
  h = X
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def _xent(params, X, y):
  return optax.softmax_cross_entropy_with_integer_labels(_mlp(params, X), y).mean()


@pytest.mark.slow
def test_digits_convergence_easgd_center_and_eamsgd():
  """8 workers on disjoint shards of digits; the center reaches > 0.85 test accuracy
  (chance is 0.10; measured about 0.95 for both)."""
  from _util import digits
  (Xtr, ytr), (Xte, yte) = digits()
  K, steps, bs = 8, 300, 32
  runner = wagrad.Runner("vmap", K)
  Xs, ys = runner.shard(Xtr, ytr)
  n = Xs.shape[1]
  rng = np.random.default_rng(0)
  idx = rng.integers(0, n, size=(steps, K, bs))
  p0 = _mlp_init(jax.random.PRNGKey(0))
  accs = {}
  for name, tx, look in [
      ("easgd", E.easgd(optax.sgd(0.1), 4), False),
      ("eamsgd", E.eamsgd(optax.sgd(0.02), 4, momentum=0.9), True)]:

    def train(p, s, X, y, idx, tx=tx, look=look):
      def one(carry, i):
        p, s = carry
        at = E.eamsgd_lookahead(p, s) if look else p   # EAMSGD: gradient at look-ahead
        loss, g = jax.value_and_grad(_xent)(at, X[i], y[i])
        u, s = tx.update(g, s, p)
        return (wagrad.apply_updates(p, u, s), s), loss
      return lax.scan(one, (p, s), idx)[0]

    p, s = runner.replicate(p0), runner.init(tx, p0)
    p, s = runner.map(train)(p, s, Xs, ys, idx.transpose(1, 0, 2).copy())
    center = E.easgd_center(s)
    accs[name] = float(np.mean(np.argmax(np.asarray(_mlp(center, Xte)), -1) == yte))
  print("digits center test accuracy", accs)
  assert accs["easgd"] > 0.85 and accs["eamsgd"] > 0.85, accs


def test_easgd_worker_with_nonfinite_params_heals_at_the_next_exchange():
  """A worker whose *parameters* go NaN between exchanges (tau = 4) takes the new center
  exactly at the next exchange (an additive update cannot repair NaN parameters;
  wagrad.apply_updates assigns it, issue 20), and the center stays finite."""
  K, bad, tau = 8, 3, 4
  runner = wagrad.Runner("shard_map", K)
  A, b, w0, c0 = _problem(K)
  tx = E.easgd(optax.sgd(ETA), tau, alpha=0.1, axis_name=runner.axis_name)

  def step(p, s, A, b, t):
    g = jax.grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p)
    p = wagrad.apply_updates(p, u, s)
    broken = (C.worker_index(runner.axis_name) == bad) & (t.value == 1)
    return jax.tree_util.tree_map(lambda x: jnp.where(broken, jnp.nan, x), p), s

  f = runner.map(step)
  p, s = runner.replicate({"w": w0[0]}), runner.init(tx, {"w": w0[0]})
  for t in range(tau):
    p, s = f(p, s, A, b, wagrad.Shared(jnp.int32(t)))
    w = np.asarray(p["w"])
    if t < tau - 1:
      assert np.isnan(w[bad]).all() == (t >= 1)
  assert np.isfinite(w).all()                                   # healed at the exchange
  np.testing.assert_array_equal(w[bad], np.asarray(s.shared.center["w"]))  # exactly
  assert np.isfinite(np.asarray(s.shared.center["w"])).all()


def test_eamsgd_worker_with_nonfinite_params_restarts_at_the_center():
  """EAMSGD: a worker whose parameters and velocity go NaN takes the new center and a
  zero velocity at the next exchange (its inner state restarts), so it stays finite."""
  K, bad, tau = 8, 3, 4
  runner = wagrad.Runner("vmap", K)
  A, b, w0, c0 = _problem(K)
  tx = E.eamsgd(optax.sgd(ETA), tau, momentum=0.9, alpha=0.1, axis_name=runner.axis_name)

  def step(p, s, A, b, t):
    broken = (C.worker_index(runner.axis_name) == bad) & (t.value == 1)
    g = jax.grad(ls_loss)(E.eamsgd_lookahead(p, s), A, b)
    g = jax.tree_util.tree_map(lambda x: jnp.where(broken, jnp.nan, x), g)  # NaN velocity
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s

  f = runner.map(step)
  p, s = runner.replicate({"w": w0[0]}), runner.init(tx, {"w": w0[0]})
  for t in range(tau + 3):
    p, s = f(p, s, A, b, wagrad.Shared(jnp.int32(t)))
    w = np.asarray(p["w"])
    assert np.isnan(w[bad]).all() == (1 <= t < tau - 1), t
    if t == tau - 1:
      np.testing.assert_array_equal(w[bad], np.asarray(s.shared.center["w"]))
      assert (np.asarray(s.inner[1].velocity["w"])[bad] == 0).all()
  assert np.isfinite(w).all()
