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
