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
  assert not any("easgd" in v or "lsgd" in v for v in rows)
  r = rows["wagrad model_averaging exact=False tau=4"]
  for key in ("median_ratio_to_hand_90ci", "median_ratio_to_hand_as_updates_90ci",
              "median_ratio_to_local_sgd_90ci"):
    lo, hi = r[key]
    assert 0 < lo <= hi
  assert rows["hand averaging tau=16"]["target_ratio_to_local_sgd"] == 1 + 1 / 16


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
