"""Smoke test of the benchmark scripts at tiny size (no timing assertions)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.mark.slow
def test_overhead_benchmark_tiny(tmp_path, monkeypatch):
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import overhead
  data = overhead.main(["--quick", "--steps", "2", "--reps", "1", "--models", "tiny"])
  data = data["models"]["tiny"]
  rows = {r["variant"]: r for r in data["rows"]}
  assert (tmp_path / "overhead.json").exists() and (tmp_path / "overhead.png").exists()
  # compile once: every wagrad step function was traced exactly once
  assert all(r["num_traces"] == 1 for r in data["rows"] if "num_traces" in r)
  # communication read from the compiled HLO: local SGD moves nothing, sync SGD all-reduces
  # every step, periodic averaging only inside the exchange branch
  assert rows["local_sgd (no comm)"]["collective_bytes"]["every_step"] == {}
  assert rows["wagrad sync_sgd"]["collective_bytes"]["every_step"].get("all-reduce", 0) > 0
  ma = rows["wagrad model_averaging tau=4"]["collective_bytes"]
  assert "all-reduce" not in ma["every_step"] and ma["in_branches"]["all-reduce"] >= data["param_bytes"]


@pytest.mark.slow
def test_overhead_targets_mode_tiny(tmp_path, monkeypatch):
  """--targets: only the variants the targets compare, with bootstrap intervals."""
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import overhead
  data = overhead.main(["--targets", "--steps", "2", "--reps", "3", "--models", "tiny"])
  rows = {r["variant"]: r for r in data["models"]["tiny"]["rows"]}
  assert (tmp_path / "overhead_targets.json").exists()
  assert data["models"]["tiny"]["donated"] is True
  # only algorithms with a hand-written equivalent, each compared with it
  assert not any("wasgd" in v or "wpsgd" in v for v in rows)
  for algo, family in (("model_averaging exact=False", "averaging"), ("easgd", "easgd"),
                       ("lsgd", "lsgd")):
    r = rows[f"wagrad {algo} tau=4"]
    assert r["hand"] == f"hand {family} tau=4"
    for key in ("median_ratio_to_hand_90ci", "median_ratio_to_hand_as_updates_90ci",
                "median_ratio_to_local_sgd_90ci"):
      lo, hi = r[key]
      assert 0 < lo <= hi
  assert rows["hand averaging tau=16"]["target_ratio_to_local_sgd"] == 1 + 1 / 16


@pytest.mark.parametrize("kind,make", [
    ("averaging", lambda wagrad, sgd, tau: wagrad.model_averaging(sgd, tau)),
    ("easgd", lambda wagrad, sgd, tau: wagrad.easgd(sgd, tau)),
    ("lsgd", lambda wagrad, sgd, tau: wagrad.lsgd(sgd, tau)),
])
def test_hand_written_steps_do_the_same_math(kind, make):
  """The overhead benchmark's raw-lax steps compute what the wagrad transforms compute
  (over two exchanges), so the ratios compare equal work."""
  import jax
  import numpy as np
  import optax
  import wagrad
  import overhead
  runner = wagrad.Runner("shard_map", 8)
  p0, x, y, loss_fn = overhead.setup(8, 8, 16)
  tau, steps = 3, 7
  ours, st = overhead.wagrad_variant(runner, make(wagrad, optax.sgd(overhead.LR), tau),
                                     p0, x, y, loss_fn)
  for _ in range(steps):
    st = ours(*st)
  for as_updates in (False, True):
    hand, hs = overhead.hand_variant(runner, p0, x, y, loss_fn, tau, kind=kind,
                                     as_updates=as_updates)
    for _ in range(steps):
      hs = hand(*hs)
    for a, b in zip(jax.tree_util.tree_leaves(st[0]), jax.tree_util.tree_leaves(hs[0])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # and the workers really differ between exchanges (the comparison is not vacuous)
  w = jax.tree_util.tree_leaves(st[0])[0]
  assert not np.allclose(np.asarray(w[0]), np.asarray(w[1]))


@pytest.mark.slow
def test_convergence_benchmark_tiny(tmp_path, monkeypatch):
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import convergence
  data = convergence.main(["--seeds", "1", "--steps", "20"])
  assert {c["verdict"] for c in data["claims"]} <= {"holds", "does not hold",
                                                   "tie (within seed spread)"}
  assert json.load(open(tmp_path / "convergence.json"))["steps"] == 20


def test_report_renders_committed_results(capsys):
  """README's benchmark tables come from the committed JSON through report.py."""
  import report
  report.main()
  out = capsys.readouterr().out
  assert "wagrad model_averaging tau=4" in out and "x hand-written" in out
  assert "hand + flat target" in out and "shard_map with 8 workers" in out


@pytest.mark.slow
def test_overhead_targets_in_fresh_processes_tiny(tmp_path, monkeypatch):
  """--targets --processes: each family timed in fresh processes, median and range."""
  import common
  monkeypatch.setattr(common, "OUT", str(tmp_path))
  import overhead
  data = overhead.main(["--targets", "--processes", "2", "--family", "lsgd", "--steps", "2",
                        "--reps", "2", "--models", "tiny"])
  rows = {r["variant"]: r for r in data["models"]["tiny"]["rows"]}
  assert (tmp_path / "overhead_targets.json").exists() and data["processes"] == 2
  assert not any("averaging" in v or "easgd" in v for v in rows)
  r = rows["wagrad lsgd tau=4"]
  for key in ("x_hand", "x_hand_as_updates", "x_local_sgd"):
    v = r[key]
    assert len(v["per_process"]) == 2 and v["min"] <= v["median"] <= v["max"]
  with pytest.raises(SystemExit):
    overhead.main(["--processes", "2"])  # only with --targets


def test_overhead_rejects_unknown_family_and_model():
  import overhead
  with pytest.raises(SystemExit, match="unknown family 'sgd'"):
    overhead.main(["--targets", "--family", "sgd"])
  with pytest.raises(SystemExit, match="unknown model 'huge'"):
    overhead.main(["--models", "huge"])
