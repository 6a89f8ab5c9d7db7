"""The README's main job, in a reduced size: accuracy above chance by a stated margin."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


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
  path = tmp_path / argv[1] / "results.json"  # one file per algorithm, its path printed
  res = json.load(open(path))
  assert res["test_accuracy"] > 0.75 and res["gone"] == [], res
  assert "test accuracy" in p.stdout and f"wrote {path}" in p.stdout
  assert "recoverable task" not in p.stderr, p.stderr[-2000:]  # JAX's notice, left out
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


def test_async_digits_help_shows_defaults(capsys):
  import async_digits
  with pytest.raises(SystemExit):
    async_digits.parse_args(["--help"])
  out = capsys.readouterr().out
  assert async_digits.__doc__.splitlines()[0] in out
  for default in ("(default: 300)", "(default: easgd)", "(default: 16)", "(default: 0.1)",
                  "(default: shards)", "(default: runs/async_digits)"):
    assert default in " ".join(out.split()), default


def test_async_digits_results_per_algorithm(tmp_path, capsys):
  """Each algorithm's run writes its own results file (the next run's leaves it) and
  prints where; the master's serving loop is stubbed, no process is started."""
  import json
  import types

  import numpy as np

  import async_digits
  stub = types.SimpleNamespace(**{
      f"serve_{algo}": lambda params0, K, *a, **k: (params0, np.arange(1, K + 1), [])
      for algo in ("easgd", "lsgd")})
  for algo in ("easgd", "lsgd"):
    a = async_digits.parse_args(["--algo", algo, "--workers", "2", "--out", str(tmp_path)])
    assert async_digits.serve(a, 2, {"w": 0.0}, lambda p: 0.5, stub) == 0
    path = tmp_path / algo / "results.json"
    assert f"wrote {path}" in capsys.readouterr().out
  for algo in ("easgd", "lsgd"):
    res = json.load(open(tmp_path / algo / "results.json"))
    assert res["args"]["algo"] == algo and res["served"] == [1, 2], res


def test_readme_names_async_stragglers_with_its_folder():
  import re
  readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  assert "benchmarks/async_stragglers.py" in readme
  assert not re.search(r"(?<!benchmarks/)async_stragglers\.py", readme)


def test_launcher_leaves_out_jax_recoverability_notice(capfd):
  """JAX's C++ notice that recoverable tasks are on (logged whenever
  ``jax_enable_recoverability`` is) is dropped from the processes' output, live (rank 0)
  and in a failed process's dump; every other line, errors included, passes."""
  import processes
  notice = ("W1207 22:49:44.771663    2629 coordination_service.cc:185] [84438] Using "
            "experimental recoverable task feature. The default shutdown barrier will only "
            "block non-recoverable tasks.")
  code = ("import sys; r = sys.argv[-1]; print(%r, file=sys.stderr); "
          "print('E real error from', r, file=sys.stderr); sys.exit(3 if r == '1' else 0)"
          % notice)
  assert processes.launch([sys.executable, "-c", code], 2, deadline_s=60) == 3
  err = capfd.readouterr().err
  assert "recoverable task" not in err, err
  assert "E real error from 0" in err and "E real error from 1" in err, err
  assert "process 1 exited with 3" in err, err


@pytest.mark.slow
def test_async_downpour_simulation_converges_on_digits():
  """downpour(asynchronous=True) with half the workers 4x slower, each pushing on its own
  clock: the master's model beats chance (0.1) by a wide margin."""
  from digits_lib import train_digits
  (r,) = train_digits(["downpour_async"], steps=200, eval_every=200, sync_period=4,
                      progress=False, sampling="whole")
  assert r["test_acc"] > 0.8, r


def test_quickstart_trains_in_under_60_lines():
  """examples/quickstart.py, as a reader runs it: one page, and the center it tests
  has learnt the digits."""
  import subprocess
  path = os.path.join(ROOT, "examples", "quickstart.py")
  assert len(open(path).read().splitlines()) < 60
  p = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=600,
                     env={**os.environ, "XLA_FLAGS": ""})
  assert p.returncode == 0, p.stderr[-3000:]
  accuracy = float(p.stdout.split()[-1])
  assert accuracy > 0.9, p.stdout
