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


@pytest.mark.slow
@pytest.mark.parametrize("argv", [  # downpour steps as easgd does (a worker's update)
    ["--algo", "easgd"], ["--algo", "softsync"], ["--algo", "lsgd"],
    ["--algo", "wpsgd", "--budget-s", "2", "--slow", "4", "--step-ms", "2"]])
def test_async_digits_example_trains_across_processes(argv, tmp_path):
  """One command starts the master and 2 worker processes; the master's model beats
  chance (0.1) by a wide margin. The launcher kills every process at its deadline."""
  import json
  import subprocess
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = os.path.join(os.path.dirname(__file__), "..", "examples", "async_digits.py")
  p = subprocess.run([sys.executable, script, *argv, "--workers", "2", "--steps", "100",
                      "--eval-every", "10", "--deadline", "150", "--out", str(tmp_path)],
                     env=env, capture_output=True, text=True, timeout=200)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  res = json.load(open(tmp_path / "results.json"))
  assert res["test_accuracy"] > 0.75 and res["gone"] == [], res
  assert "test accuracy" in p.stdout
  if "--budget-s" in argv:  # a wall-clock budget: the slow worker took fewer steps
    assert res["served"][0] < res["served"][1]
  else:
    assert len(res["curve"]) >= 2  # progress while it ran


def test_async_digits_bad_options_are_named(capsys):
  import async_digits
  with pytest.raises(SystemExit):  # argparse's one-line error, exit code 2
    async_digits.main(["--algo", "softsync", "--workers", "3", "--softsync-n", "2"])
  assert "must divide" in capsys.readouterr().err
  assert async_digits.main(["--rank", "1"]) == 2
  assert "--coordinator" in capsys.readouterr().err


@pytest.mark.slow
def test_async_downpour_simulation_converges_on_digits():
  """downpour(asynchronous=True) with half the workers 4x slower, each pushing on its own
  clock: the master's model beats chance (0.1) by a wide margin."""
  from digits_lib import train_digits
  (r,) = train_digits(["downpour_async"], steps=200, eval_every=200, sync_period=4,
                      progress=False, sampling="whole")
  assert r["test_acc"] > 0.8, r
