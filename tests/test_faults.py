"""Faults: a worker dropped for a stretch rejoins and is resynchronised at the next
exchange; stragglers keep the healthy workers training; the metrics show it."""
import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp

import wagrad
from _util import least_squares, ls_loss

K, TAU, STEPS, DROPPED = 8, 4, 12, 2


def _active():
  """Worker 2 drops out for steps 1..6 (misses the exchange at step 3) and rejoins;
  worker 7 is a 2x straggler."""
  a = wagrad.schedules.speed_schedule(K, STEPS, [1.0] * 7 + [0.5], seed=0)
  return wagrad.schedules.drop_workers(a, DROPPED, 1, 7)


FAMILIES = {
    # name: (factory, extra-args builder (active row, t) -> dict)
    "model_averaging": (lambda ax: wagrad.model_averaging(optax.sgd(0.1), TAU, axis_name=ax),
                        lambda a, t: {"active": a}),
    "lsgd": (lambda ax: wagrad.lsgd(optax.sgd(0.1), TAU, pull=1.0, proximal=0.0, axis_name=ax),
             lambda a, t: {"active": a}),
    "wpsgd": (lambda ax: wagrad.wpsgd(optax.sgd(0.1), TAU, weighting="samples", axis_name=ax),
              lambda a, t: {"active": a}),
}


@pytest.mark.parametrize("backend", ["vmap", "shard_map"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_dropped_worker_rejoins_and_resynchronises(name, backend):
  make, extra = FAMILIES[name]
  r = wagrad.Runner(backend, K)
  tx = make(r.axis_name)
  A, b = least_squares(K)
  active = _active()

  def step(p, s, A, b, kw):
    loss, g = jax.value_and_grad(ls_loss)(p, A, b)
    u, s = tx.update(g, s, p, value=loss, **kw)
    return wagrad.apply_updates(p, u, s), s

  f = r.map(step)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  hist = []
  for t in range(STEPS):
    prev = np.asarray(p["w"])
    p, s = f(p, s, A, b, extra(active[t], t))
    w = np.asarray(p["w"])
    hist.append(w)
    if not active[t, DROPPED] and (t + 1) % TAU:
      np.testing.assert_array_equal(w[DROPPED], prev[DROPPED])  # dropped: unchanged
    assert np.isfinite(w).all()
  # every exchange (steps 3, 7, 11) leaves all workers, the dropped one included, equal:
  # the rejoined worker is resynchronised (and at step 3 it received the mix while out)
  for t in (3, 7, 11):
    assert (hist[t] == hist[t][0]).all(), (name, t)
  # healthy workers kept training while worker 2 was out
  assert not np.allclose(hist[5][0], hist[3][0])
  if name == "wpsgd":  # metrics: weights of the last round follow the steps taken
    wts = np.asarray(s.shared.weights)
    assert wts[7] < wts[0] and np.isclose(wts.sum(), 1.0)


def test_dropped_worker_has_no_weight_in_the_average():
  """At step 3 worker 2 is out: the mean is over the 7 others (model averaging)."""
  r = wagrad.Runner("vmap", K)
  tx = wagrad.model_averaging(optax.sgd(0.1), TAU, axis_name=r.axis_name)
  A, b = least_squares(K)
  active = np.ones((STEPS, K), bool)
  active[:, DROPPED] = False
  poison = jnp.asarray(np.where(np.arange(K) == DROPPED, 1e6, 0.0), jnp.float32)

  def step(p, s, A, b, a, bump):
    g = jax.grad(ls_loss)(p, A, b)
    g = jax.tree_util.tree_map(lambda x: x + bump, g)  # the dropped worker's step would be huge
    u, s = tx.update(g, s, p, active=a)
    return wagrad.apply_updates(p, u, s), s
  f = r.map(step)
  p0 = {"w": jnp.zeros(3)}
  p, s = r.replicate(p0), r.init(tx, p0)
  for t in range(TAU):
    p, s = f(p, s, A, b, active[t], poison)
  w = np.asarray(p["w"])
  assert np.abs(w).max() < 10 and (w == w[0]).all()
