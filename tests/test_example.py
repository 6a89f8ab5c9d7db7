"""The README's main job, in a reduced size: accuracy above chance by a stated margin."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


@pytest.mark.slow
def test_cpu_digits_example_reduced(tmp_path):
  import cpu_digits
  rc = cpu_digits.main(["--algorithms", "sync_sgd", "model_averaging", "--steps", "120",
                        "--eval-every", "60", "--out", str(tmp_path)])
  assert rc == 0
  import json
  res = json.load(open(tmp_path / "results.json"))["results"]
  # chance is 0.1 on 10 classes; a 120-step run reaches > 0.8
  assert all(r["test_acc"] > 0.8 for r in res), res
  assert (tmp_path / "accuracy.png").exists()


def test_cpu_digits_bad_algorithm_one_line(capsys):
  import cpu_digits
  assert cpu_digits.main(["--algorithms", "nope"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown algorithm" in err[0]


@pytest.mark.parametrize("argv,needle", [
    (["--algorithms", "wpsgd", "--worker-speeds", "1,2"], "speeds"),
    (["--algorithms", "wpsgd", "--worker-speeds", "1,x"], "--worker-speeds"),
    (["--algorithms", "asgd", "--softsync-n", "3"], "must divide"),
])
def test_cpu_digits_bad_schedule_options_one_line(argv, needle, capsys, tmp_path):
  import cpu_digits
  assert cpu_digits.main(argv + ["--steps", "2", "--out", str(tmp_path), "--no-plot"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0], err


@pytest.mark.slow
def test_cpu_digits_whole_training_set_sampling(tmp_path, monkeypatch):
  """--sampling whole: every worker draws from all 1400 training images (the papers'
  setting), and the run still learns."""
  import json
  import cpu_digits
  import digits_lib
  seen = []
  real = digits_lib.np.take_along_axis
  monkeypatch.setattr(digits_lib.np, "take_along_axis",
                      lambda *a, **k: seen.append(1) or real(*a, **k))
  rc = cpu_digits.main(["--algorithms", "model_averaging", "--steps", "120", "--sampling",
                        "whole", "--eval-every", "60", "--out", str(tmp_path), "--no-plot"])
  assert rc == 0 and not seen  # never indexed a worker's own shard
  res = json.load(open(tmp_path / "results.json"))
  assert res["args"]["sampling"] == "whole" and res["results"][0]["test_acc"] > 0.8
