"""sync_sgd, model_averaging (warm-up, period schedules, outer optimizer / DiLoCo,
optimizer-state policy), one-shot averaging: against NumPy references."""

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

import wagrad
from wagrad._src import collectives as C
from _util import BACKENDS, BACKEND_IDS, least_squares, ls_grad_np, ls_loss


def make_step(tx):
  def step(p, s, A, b):
    loss, g = jax.value_and_grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss)
    return wagrad.apply_updates(p, u, s), s, loss
  return step


def run_tx(backend, K, make_tx, steps, seed=0):
  r = wagrad.Runner(backend, K)
  tx = make_tx(r.axis_name)
  A, b = least_squares(K, seed=seed)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  f = r.map(make_step(tx))
  for _ in range(steps):
    p, s, _ = f(p, s, A, b)
  return np.asarray(p["w"]), s, A, b


def np_model_averaging(A, b, lr, tau, steps, warmup=0, period_fn=None, outer=None):
  """NumPy local SGD + averaging; outer(x_global, delta) -> new x_global."""
  K = A.shape[0]
  x = np.zeros((K, 3))
  xg = np.zeros(3)
  last = 0
  n_ex = 0
  for t in range(steps):
    g = np.stack([ls_grad_np(x[i], A[i], b[i]) for i in range(K)])
    if t < warmup:
      g = np.broadcast_to(g.mean(0), g.shape)
    x = x - lr * g
    period = tau if period_fn is None else max(1, int(period_fn(t)))
    if warmup and t == warmup - 1:
      x, xg = np.broadcast_to(x[0], x.shape).copy(), x[0].copy()
      last, n_ex = t + 1, n_ex + 1
    elif t >= warmup and t + 1 - last >= period:
      xbar = x.mean(0)
      xg = xbar if outer is None else outer(xg, xg - xbar)
      x = np.broadcast_to(xg, x.shape).copy()
      last, n_ex = t + 1, n_ex + 1
  return x, n_ex


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_model_averaging_matches_numpy(backend, K):
  steps, tau, warm = 11, 3, 2
  w, s, A, b = run_tx(backend, K, lambda ax: wagrad.model_averaging(
      optax.sgd(0.1), tau, warmup_steps=warm, axis_name=ax), steps)
  ref, n_ex = np_model_averaging(A, b, 0.1, tau, steps, warmup=warm)
  np.testing.assert_allclose(w, ref, rtol=2e-5, atol=1e-6)
  assert int(s.shared.num_exchanges) == n_ex == 4  # warm-up end (t=1), t=4, 7, 10
  assert int(s.shared.count) == steps
  # exact assignment: after the exchange at the last step every worker is identical
  assert (w == w[0]).all()


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_model_averaging_inexact_matches_numpy(backend, K):
  """exact=False: no x_global in the state (no float buffer at all), the same math up
  to rounding; workers agree up to the last bits after an exchange."""
  steps, tau, warm = 11, 3, 2
  w, s, A, b = run_tx(backend, K, lambda ax: wagrad.model_averaging(
      optax.sgd(0.1), tau, warmup_steps=warm, axis_name=ax, exact=False), steps)
  ref, n_ex = np_model_averaging(A, b, 0.1, tau, steps, warmup=warm)
  np.testing.assert_allclose(w, ref, rtol=2e-5, atol=1e-6)
  assert int(s.shared.num_exchanges) == n_ex == 4 and not bool(s.shared.assign)
  assert s.shared.target is None
  assert [x.dtype for x in jax.tree_util.tree_leaves(s.shared)] == [jnp.int32] * 3 + [jnp.bool_]
  np.testing.assert_allclose(w, np.broadcast_to(w[0], w.shape), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="exact"):
    wagrad.model_averaging(optax.sgd(0.1), 4, exact=False, outer_optimizer=optax.sgd(1.0))


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_sync_sgd_matches_numpy(backend, K):
  steps = 5
  w, s, A, b = run_tx(backend, K, lambda ax: wagrad.sync_sgd(optax.sgd(0.1), axis_name=ax), steps)
  x = np.zeros(3)
  for _ in range(steps):
    x = x - 0.1 * np.mean([ls_grad_np(x, A[i], b[i]) for i in range(K)], axis=0)
  np.testing.assert_allclose(w, np.broadcast_to(x, w.shape), rtol=1e-5, atol=1e-6)
  assert (w == w[0]).all()


@pytest.mark.parametrize("backend,K", BACKENDS, ids=BACKEND_IDS)
def test_period_schedule_matches_numpy(backend, K):
  sched = lambda t: 2 + t // 6  # period grows from 2 to 3
  steps = 14
  w, s, A, b = run_tx(backend, K, lambda ax: wagrad.model_averaging(
      optax.sgd(0.1), sched, axis_name=ax), steps)
  ref, n_ex = np_model_averaging(A, b, 0.1, None, steps, period_fn=sched)
  np.testing.assert_allclose(w, ref, rtol=2e-5, atol=1e-6)
  assert int(s.shared.num_exchanges) == n_ex


def test_outer_sgd_lr1_equals_plain_averaging():
  """Decision 3: x_g - (x_g - xbar) may differ from xbar by an ulp; stated tolerance 1 ulp."""
  steps = 9
  w1, *_ = run_tx("vmap", 8, lambda ax: wagrad.model_averaging(optax.sgd(0.1), 3, axis_name=ax), steps)
  w2, *_ = run_tx("vmap", 8, lambda ax: wagrad.model_averaging(
      optax.sgd(0.1), 3, outer_optimizer=optax.sgd(1.0), axis_name=ax), steps)
  ulp = np.spacing(np.abs(w1).astype(np.float32))
  assert np.all(np.abs(w1 - w2) <= ulp)


def np_adam_update(g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, x=None):
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
  u = -lr * (mh / (np.sqrt(vh) + eps) + wd * x)
  return u, m, v


@pytest.mark.parametrize("backend,K", BACKENDS[:3], ids=BACKEND_IDS[:3])
def test_diloco_matches_numpy(backend, K):
  lr_in, lr_out, mom, H, steps, wd = 0.05, 0.7, 0.9, 3, 12, 0.1
  w, s, A, b = run_tx(backend, K, lambda ax: wagrad.diloco(
      optax.adamw(lr_in, weight_decay=wd), H, outer_learning_rate=lr_out,
      outer_momentum=mom, axis_name=ax), steps)
  x, m, v = np.zeros((K, 3)), np.zeros((K, 3)), np.zeros((K, 3))
  xg, buf = np.zeros(3), np.zeros(3)
  for t in range(steps):
    for i in range(K):
      g = ls_grad_np(x[i], A[i], b[i])
      u, m[i], v[i] = np_adam_update(g, m[i], v[i], t + 1, lr_in, wd=wd, x=x[i])
      x[i] = x[i] + u
    if (t + 1) % H == 0:
      delta = xg - x.mean(0)
      buf = mom * buf + delta                 # optax sgd(momentum, nesterov=True)
      xg = xg - lr_out * (delta + mom * buf)
      x[:] = xg
  np.testing.assert_allclose(w, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,K", BACKENDS[:3], ids=BACKEND_IDS[:3])
def test_opt_state_sync_average_and_reset(backend, K):
  steps, tau = 6, 3
  for policy in ("average", "reset"):
    w, s, A, b = run_tx(backend, K, lambda ax: wagrad.model_averaging(
        optax.sgd(0.05, momentum=0.9), tau, opt_state_sync=policy, axis_name=ax), steps)
    x, vel = np.zeros((K, 3)), np.zeros((K, 3))
    for t in range(steps):
      g = np.stack([ls_grad_np(x[i], A[i], b[i]) for i in range(K)])
      vel = 0.9 * vel + g
      x = x - 0.05 * vel
      if (t + 1) % tau == 0:
        x[:] = x.mean(0)
        vel = np.broadcast_to(vel.mean(0), vel.shape).copy() if policy == "average" else 0 * vel
    np.testing.assert_allclose(w, x, rtol=2e-5, atol=1e-6, err_msg=policy)


def test_exchange_steps_under_chain_multi_transform_and_multisteps():
  """Step-count correctness: exchanges at exactly the documented steps."""
  K, steps, tau = 8, 12, 4
  sched = optax.linear_schedule(0.1, 0.01, 12)
  inners = {
      "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(sched)),
      "multi_transform": optax.multi_transform(
          {"a": optax.sgd(0.1), "b": optax.adam(0.01)}, {"w": "a", "v": "b"}),
      "multisteps": optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2).gradient_transformation(),
  }
  for name, inner in inners.items():
    tx = wagrad.model_averaging(inner, tau)
    r = wagrad.Runner("vmap", K)
    p0 = {"w": jnp.zeros(3), "v": jnp.zeros(2)}
    A, b = least_squares(K)

    def step(p, s, A, b):
      g = jax.grad(lambda p: ls_loss(p, A, b) + jnp.sum(p["v"] ** 2))(p)
      u, s = tx.update(g, s, p)
      return wagrad.apply_updates(p, u, s), s, wagrad.Shared(s.shared.assign)
    f = r.map(step)
    p, s = r.replicate(p0), r.init(tx, p0)
    exchanged = []
    for _ in range(steps):
      p, s, a = f(p, s, A, b)
      exchanged.append(bool(a.value))
    assert [t for t, e in enumerate(exchanged) if e] == [3, 7, 11], name


def test_skipped_local_step_still_exchanges():
  """apply_if_finite drops worker 0's NaN gradient; the exchange still runs and worker 0
  still receives the average (PyTorch's averager would skip it)."""
  K, tau = 8, 2
  tx = wagrad.model_averaging(optax.apply_if_finite(optax.sgd(0.1), 5), tau)
  r = wagrad.Runner("vmap", K)
  A, b = least_squares(K)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    bad = C.worker_index(r.axis_name) == 0
    g = jax.tree_util.tree_map(lambda x: jnp.where(bad, jnp.nan, x), g)
    u, s = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s), s, wagrad.Shared(s.shared.assign)
  f = r.map(step)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  p, s, _ = f(p, s, A, b)
  w1 = np.asarray(p["w"])
  assert (w1[0] == 0).all() and not (w1[1] == 0).all()  # worker 0 skipped its step
  p, s, a = f(p, s, A, b)
  w = np.asarray(p["w"])
  assert bool(a.value) and np.isfinite(w).all() and (w == w[0]).all()
  assert int(s.shared.num_exchanges) == 1


def _count_exchange_branch(backend, tau=4):
  """Count how often the exchange branch executes (design.md, Tests that prove something)."""
  K, steps = 8, 12
  tx = wagrad.model_averaging(optax.sgd(0.1), tau)
  r = wagrad.Runner(backend, K)
  A, b = least_squares(K)

  def step(p, s, A, b):
    g = jax.grad(ls_loss)(p, A, b)
    u, s2 = tx.update(g, s, p)
    return wagrad.apply_updates(p, u, s2), s2, 0.0
  f = r.map(step)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  for _ in range(steps):
    p, s, _ = f(p, s, A, b)
  hlo = f.lower(p, s, A, b).compile().as_text()
  return int(s.shared.num_exchanges), hlo


@pytest.mark.parametrize("period,expected", [(4, 3), (lambda t: 3 + t // 6, 3)],
                         ids=["int", "schedule"])
def test_no_collective_on_non_exchange_steps(period, expected):
  # int: exchanges end steps 3, 7, 11; schedule 3,3,..,4: steps 2, 5, 9
  n, hlo = _count_exchange_branch("shard_map", period)
  assert n == expected
  # Every all-reduce of the compiled program sits inside a branch computation of the
  # conditional: the entry computation (run every step) has none.
  entry = hlo[hlo.index("ENTRY"):]
  entry = entry[: entry.index("\n}")]
  assert "all-reduce" not in entry and "conditional" in entry
  assert "all-reduce" in hlo


def test_one_shot_averaging():
  K, steps = 8, 6
  r = wagrad.Runner("vmap", K)
  tx = wagrad.model_averaging(optax.sgd(0.1), None)
  w, s, A, b = run_tx("vmap", K, lambda ax: tx, steps)
  assert int(s.shared.num_exchanges) == 0
  ref, _ = np_model_averaging(A, b, 0.1, 10 ** 9, steps)
  np.testing.assert_allclose(w, ref, rtol=2e-5, atol=1e-6)
  avg = jax.device_get(r.map(lambda w: wagrad.one_shot_average(w, r.axis_name).value)(w))
  np.testing.assert_allclose(avg[0], ref.mean(0), rtol=2e-5, atol=1e-6)


def test_bad_arguments_named():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.model_averaging(sgd, 0)
  with pytest.raises(ValueError, match="sync_period"):
    wagrad.model_averaging(sgd, lambda t: 1 - t // 100)  # < 1 from step 100 on
  with pytest.raises(ValueError, match="warmup_steps"):
    wagrad.model_averaging(sgd, 2, warmup_steps=-1)
  with pytest.raises(ValueError, match="opt_state_sync"):
    wagrad.model_averaging(sgd, 2, opt_state_sync="mean")
  with pytest.raises(ValueError, match="outer_optimizer"):
    wagrad.model_averaging(sgd, None, outer_optimizer=optax.sgd(1.0))
  with pytest.raises(TypeError, match="inner"):
    wagrad.model_averaging("sgd", 2)
  tx = wagrad.model_averaging(sgd, 2)
  with pytest.raises(ValueError, match="not bound"):
    jax.jit(lambda p: tx.update(p, tx.init(p), p))({"w": jnp.ones(2)})
  r = wagrad.Runner("vmap", 2)
  with pytest.raises(TypeError, match="different pytree structures"):
    r.map(lambda p, s: tx.update({"v": p["w"]}, s, p)[0])(
        {"w": np.ones((2, 3), np.float32)}, r.init(tx, {"w": jnp.ones(3)}))


def test_schedule_rules_python_if_and_rounding():
  """A schedule with a Python ``if`` on the step fails at trace time with a message that
  says to use jnp.where; a float period is rounded to the nearest integer (2.9 -> 3)."""
  r = wagrad.Runner("vmap", 4)
  p0 = {"w": np.zeros(2, np.float32)}

  def run(tx, steps):
    def step(p, s):
      u, s = tx.update(p, s, p)
      return wagrad.apply_updates(p, u, s), s, s.shared.last_exchange
    f = r.map(step)
    p, s, seen = r.replicate(p0), r.init(tx, p0), []
    for _ in range(steps):
      p, s, last = f(p, s)
      seen.append(int(np.asarray(last).ravel()[0]))
    return seen

  bad = wagrad.model_averaging(optax.sgd(0.1), lambda t: 2 if t < 100 else 4)
  with pytest.raises(TypeError, match="jnp.where"):
    run(bad, 1)
  last = run(wagrad.model_averaging(optax.sgd(0.1), lambda t: 2.9 + 0.0 * t), 9)
  assert last == [0, 0, 3, 3, 3, 6, 6, 6, 9]  # exchanges end steps 2, 5, 8: period 3


def test_model_averaging_as_one_label_of_multi_transform():
  """optax.multi_transform: the averaged label is assigned exactly at the exchange, the
  other label follows its own optimizer (issue 20: this crashed)."""
  r = wagrad.Runner("vmap", 4)
  p0 = {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}
  tx = optax.multi_transform({"avg": wagrad.model_averaging(optax.sgd(0.1), 2),
                              "own": optax.sgd(0.1)}, {"a": "avg", "b": "own"})
  g = np.arange(4, dtype=np.float32)[:, None]

  def step(p, s, g):
    grads = jax.tree_util.tree_map(lambda x: g * jnp.ones_like(x), p)
    u, s = tx.update(grads, s, p)
    return wagrad.apply_updates(p, u, s), s
  f = r.map(step)
  p, s = r.replicate(p0), r.init(tx, p0)
  for _ in range(2):
    p, s = f(p, s, g)
  a, b = np.asarray(p["a"]), np.asarray(p["b"])
  assert (a == a[0]).all()                                  # exchanged: bit-identical
  np.testing.assert_allclose(a[0], 1.0 - 0.2 * 1.5, rtol=1e-6)
  np.testing.assert_allclose(b[:, 0], 1.0 - 0.2 * g[:, 0], rtol=1e-6)  # not averaged
