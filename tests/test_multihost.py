"""Two processes x 4 forced CPU devices joined by jax.distributed (gloo on loopback)
give the same result as one process with 8 devices. Every child process is killed
(SIGKILL) at a deadline, so a hung run fails the test instead of hanging CI."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DEADLINE = 240


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def _wait_all(procs, deadline):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=deadline)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"multi-process run did not finish within {deadline}s (killed)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  from multihost_algos import factories, run_algorithms
  algos = list(factories())
  port = str(_free_port())
  out = str(tmp_path / "mh.npz")
  procs = [_spawn([port, "2", str(i), out, ",".join(algos)]) for i in (1, 0)]
  outs = _wait_all(procs, DEADLINE)
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
  multi = np.load(out)
  single = run_algorithms(algos)  # this process: 8 forced devices, one process
  for name in algos:
    # gloo sums in another order than the in-process all-reduce: rounding only
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isfinite(multi[name]).all()
    np.testing.assert_allclose(multi[name + "_evaluated"], single[name + "_evaluated"],
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_unreachable_coordinator_is_a_clear_error():
  code = (
      "import os; os.environ['JAX_PLATFORMS']='cpu'\n"
      "import wagrad\n"
      "try:\n"
      f"  wagrad.initialize_distributed('127.0.0.1:{_free_port()}', 2, 1, timeout_seconds=3)\n"
      "except ConnectionError as e:\n"
      "  print('CONNERR', e)\n")
  p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  out = _wait_all([p], 120)[0]
  assert "CONNERR could not join the JAX distributed runtime at 127.0.0.1" in out, out[-3000:]


def test_bad_distributed_arguments():
  import wagrad
  with pytest.raises(ValueError, match="coordinator_address"):
    wagrad.initialize_distributed("localhost", 2, 0)
  with pytest.raises(ValueError, match="process_id"):
    wagrad.initialize_distributed("127.0.0.1:1234", 2, 2)
