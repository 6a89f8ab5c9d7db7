"""Smoke test of the benchmark scripts at tiny size (no timing assertions)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.mark.slow
def test_overhead_benchmark_tiny(tmp_path, monkeypatch):
  """The realistic-size benchmark's machinery at a toy size: every variant compiled
  once, paired ratios, copies and collective bytes read from the compiled program."""
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import overhead
  monkeypatch.setitem(overhead.SIZES, "test", 16)
  data = overhead.main(["--sizes", "test", "--taus", "4", "--steps", "2", "--reps", "2",
                        "--out", "ov"])
  assert (tmp_path / "ov.json").exists() and (tmp_path / "ov.png").exists()
  assert [r["backend"] for r in data["runs"]] == ["shard_map", "vmap"]
  for run in data["runs"]:
    rows = {r["variant"]: r for r in run["rows"]}
    assert all(r["num_traces"] == 1 for r in run["rows"])  # compiled once
    assert rows["local"]["collective_bytes"]["every_step"] == {}
    for algo in overhead.ALGOS:
      r = rows[f"wagrad {algo} tau=4"]
      q = r["x_hand_q25_q50_q75"]
      assert 0 < q[0] <= q[1] <= q[2]
      if run["backend"] == "shard_map":  # vmap has no collectives
        cb = r["collective_bytes"]
        assert "all-reduce" not in cb["every_step"]
        assert cb["in_branches"]["all-reduce"] >= 4 * run["params"]


def _assert_same_math(backend, variant, algos):
  """After 7 steps at tau 3 (two exchanges), ``variant(r, algo, tau, p0)`` holds the
  parameters of overhead.py's hand-written step, and the workers differ between
  exchanges (the comparison is not vacuous)."""
  import jax
  import numpy as np
  import wagrad
  import overhead
  r = wagrad.Runner(backend, 8)
  p0 = overhead.init_params(16)
  rng = np.random.default_rng(1)
  x = r.put(rng.normal(size=(8, 4, overhead.IN)).astype(np.float32))
  y = r.put(rng.integers(0, 10, size=(8, 4)).astype(np.int32))
  tau, steps = 3, 7
  for algo in algos:
    ours, st = variant(r, algo, tau, p0)
    hand, hs = overhead.hand_variant(r, algo, tau, p0)
    for _ in range(steps):
      st, hs = ours(*st, x, y), hand(*hs, x, y)
    for a, b in zip(jax.tree_util.tree_leaves(st[0]), jax.tree_util.tree_leaves(hs[0])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6,
                                 err_msg=algo)
    w = np.asarray(jax.tree_util.tree_leaves(st[0])[0])
    assert not np.allclose(w[0], w[1]), algo


@pytest.mark.parametrize("backend", ["shard_map", "vmap"])
def test_hand_written_steps_do_the_same_math(backend):
  """The overhead benchmark's hand-written steps compute what the wagrad transforms
  compute (over two exchanges), so the ratios compare equal work."""
  import overhead
  _assert_same_math(backend, overhead.wagrad_variant, overhead.ALGOS)


@pytest.mark.parametrize("backend", ["shard_map", "vmap"])
def test_update_api_shaped_steps_do_the_same_math(backend):
  """benchmarks/api_floor.py: the hand-written math in the update API's shape computes
  what the parameter-returning hand-written step computes, for both of its rules."""
  import api_floor
  _assert_same_math(backend, api_floor.api_variant, api_floor.ALGOS)


@pytest.mark.slow
def test_api_floor_benchmark_tiny(tmp_path, monkeypatch):
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import api_floor
  import overhead
  monkeypatch.setitem(overhead.SIZES, "test", 16)
  data = api_floor.main(["--sizes", "test", "--taus", "2", "--steps", "2", "--reps", "2",
                         "--out", "af"])
  saved = json.load(open(tmp_path / "af.json"))
  assert [r["backend"] for r in saved["runs"]] == ["shard_map", "vmap"]
  for run in data["runs"]:
    assert [r["algo"] for r in run["rows"]] == list(api_floor.ALGOS)
    for row in run["rows"]:
      for key in ("api_over_hand", "wagrad_over_api", "wagrad_over_hand"):
        assert 0 < row[key][0] <= row[key][1] <= row[key][2]
      diagnostics = {"no guard", "test only"} if row["algo"] == "averaging" else set()
      assert set(row["temp_mib"]) == {"hand", "api", "wagrad"} | diagnostics
      for key in ("no_guard_over_api", "test_only_over_api"):
        assert (key in row) == bool(diagnostics)
      assert all(v >= 0 for v in row["page_faults_mib_per_step"].values())


def test_replaced_guard_builds_are_what_they_say():
  """api_floor's diagnostic builds: with one worker non-finite, wagrad's guard averages
  the others, "test only" takes the fallback and "no guard" gives NaN; outside the
  context the guard is back."""
  import api_floor
  import jax
  import jax.numpy as jnp
  import numpy as np
  from wagrad._src import collectives
  x = jnp.arange(8.0).reshape(4, 2).at[1].set(jnp.nan)

  def mean():
    return jax.vmap(lambda t: collectives.weighted_mean(t, 1.0, "w", fallback=jnp.ones(2))
                    .value, axis_name="w")(x)[0]
  with api_floor.replaced_guard("none") as calls:
    assert np.isnan(mean()).all() and calls == ["none"]
  with api_floor.replaced_guard("test"):
    np.testing.assert_array_equal(mean(), [1.0, 1.0])
  np.testing.assert_allclose(mean(), np.asarray(x)[[0, 2, 3]].mean(0))


@pytest.mark.slow
def test_convergence_benchmark_tiny(tmp_path, monkeypatch):
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import convergence
  data = convergence.main(["--seeds", "1", "--steps", "20"])
  assert {c["verdict"] for c in data["claims"]} <= {"holds", "does not hold", "not resolved"}
  assert {c["sampling"] for c in data["claims"]} == {"shards", "whole"}
  assert json.load(open(tmp_path / "convergence.json"))["steps"] == 20


@pytest.mark.slow
def test_convergence_authors_claims_tiny(tmp_path, monkeypatch):
  """The authors'-hyperparameter claims run (multi-leader LSGD on a runner with groups)."""
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import convergence
  data = convergence.main(["--authors", "--seeds", "2", "--steps", "16"])
  assert len(data["claims"]) == len(convergence.AUTHORS_CLAIMS)
  assert all(len(c["multi_leader_lsgd_authors"]) == 2 for c in data["claims"]
             if "multi_leader_lsgd_authors" in c)
  assert (tmp_path / "convergence_authors.json").exists()


def test_claim_verdicts_follow_the_bootstrap_interval():
  import convergence
  lo, hi = convergence.bootstrap_interval([0.01, 0.02, 0.015, 0.01, 0.03])
  assert 0 < lo <= hi and convergence.verdict(lo, hi) == "holds"
  lo, hi = convergence.bootstrap_interval([0.02, -0.03, 0.01, -0.01, 0.0])
  assert lo < 0 < hi and convergence.verdict(lo, hi) == "not resolved"
  assert convergence.verdict(*convergence.bootstrap_interval([-0.01] * 5)) == "does not hold"


def test_report_renders_committed_results(capsys):
  """README's benchmark tables come from the committed JSON through report.py."""
  import report
  report.main()
  out = capsys.readouterr().out
  assert "overhead_cpu:" in out and "| 1M | shard_map | 4 |" in out
  assert "| 1M | vmap | 16 |" in out and "shard_map with 8 workers" in out


def test_overhead_rejects_unknown_size_and_algorithm():
  import overhead
  with pytest.raises(SystemExit, match="unknown size 'huge'"):
    overhead.main(["--sizes", "huge"])
  with pytest.raises(SystemExit, match="unknown algorithm 'sgd'"):
    overhead.main(["--algos", "sgd"])


@pytest.mark.parametrize("backend", ["vmap", "shard_map"])
def test_scaling_benchmark_measures_one_program(backend):
  """benchmarks/scaling.py's measurement runs (it lost its step's return value once,
  unnoticed) and compiles once."""
  import scaling
  import wagrad
  row = scaling.measure(wagrad.Runner(backend, 8), 4, steps=2, reps=1, batch=4, hidden=8)
  assert row["median_ms"] > 0 and row["num_traces"] == 1


@pytest.mark.slow
def test_async_stragglers_benchmark_tiny(tmp_path, monkeypatch):
  """Both variants run across real processes and log the evaluated model's accuracy
  (LSGD's leader; WP-SGD's combination in a wall-clock budget)."""
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import async_stragglers
  res = async_stragglers.main(["--steps", "16", "--step-ms", "1", "--deadline", "240",
                               "--algos", "lsgd,wpsgd"])
  for algo in ("lsgd", "wpsgd"):
    for variant in ("async", "lockstep"):
      tl = res[algo][variant]["timeline"]
      assert tl and all(0.0 <= acc <= 1.0 for _, acc in tl), (algo, variant)
  assert (tmp_path / "async_stragglers.png").exists()


@pytest.mark.slow
def test_exchange_benchmark_tiny(tmp_path, monkeypatch):
  """benchmarks/exchange.py at a toy size: bytes read from the compiled programs (int8
  fewer than float32 even with its padding at this size), paired step-time ratios."""
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import overhead
  import exchange
  monkeypatch.setitem(overhead.SIZES, "test", 64)
  data = exchange.main(["--parts", "bytes", "time", "--sizes", "test", "--taus", "3",
                        "--steps", "1", "--rounds", "2", "--backends", "vmap", "--out", "ex"])
  assert (tmp_path / "ex.json").exists() and (tmp_path / "ex.png").exists()
  sent = {r["variant"]: r["x_fewer_than_float32"] for r in data["bytes"]}
  assert sent["float32"] == 1.0 and sent["int8"] > sent["bfloat16"] > 1.5
  rows = {r["variant"]: r for r in data["time"]}
  assert rows["float32"]["x_float32_q25_q50_q75"] == [1.0, 1.0, 1.0]
  assert set(rows) == {"float32", "bfloat16", "int8", "streaming F=3", "streaming F=3 + int8"}


@pytest.mark.slow
def test_staleness_sweep_tiny(tmp_path, monkeypatch):
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import staleness_sweep
  data = staleness_sweep.main(["--learners", "4", "--ns", "1", "4", "--alpha0", "0.2",
                               "--seeds", "1", "--steps", "10"])
  assert (tmp_path / "staleness_sweep.png").exists()
  assert {(r["rate"], r["n"]) for r in data["rows"]} == {
      (rate, n) for rate in staleness_sweep.RATES for n in (1, 4)}
  # 1-softsync has staleness 0: the modulated rate is the fixed one, the same run
  one = [r["acc"] for r in data["rows"] if r["n"] == 1]
  assert one[0] == one[1]


def test_async_transport_benchmark_tiny(tmp_path):
  """Every transport moves the same bytes both ways between two processes (the sides
  check what arrives) and the results are written."""
  import async_transport
  assert async_transport.main(["--sizes", "1000", "--reps", "1", "--out", str(tmp_path)]) == 0
  rows = json.load(open(tmp_path / "async_transport_cpu.json"))["rows"]
  assert {r["transport"] for r in rows} == {"socket", "raw", "transfer", "store"}
  assert all(r["round_trip_s"] > 0 for r in rows)


def test_async_serving_benchmark_tiny(tmp_path):
  """One master and two workers, then two servers: every exchange is served, no one is
  taken for dead, and the rows are written."""
  import async_serving
  assert async_serving.main(["--workers", "2", "--servers", "1", "2", "--exchanges", "3",
                             "--modes", "busy", "--out", str(tmp_path)]) == 0
  rows = json.load(open(tmp_path / "async_serving_cpu.json"))["current"]["rows"]
  assert [(r["servers"], r["served"], r["gone"]) for r in rows] == [(1, 6, []), (2, 6, [])]
