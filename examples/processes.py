"""Start a multi-process run on this host: one command for the master and its workers.

Every process gets the same command line plus ``--coordinator 127.0.0.1:PORT
--processes N --rank r``; rank 0's output is the run's, the others' is shown only when
they fail. Every process is killed (SIGKILL: a hung JAX process ignores SIGTERM) at the
deadline. JAX's notice that ``jax_enable_recoverability`` is on (nothing to act on) is
left out of their output; every other line passes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

# JAX's coordination service logs this (a C++ warning, once per run) whenever
# ``jax_enable_recoverability`` is on, as it is for a worker that may die.
QUIET = "Using experimental recoverable task feature"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _forward(stream, to) -> None:
  """Copy ``stream``'s lines to ``to`` as they come, less the ``QUIET`` notice."""
  for line in stream:
    if QUIET not in line:
      to.write(line)
      to.flush()


def _quiet(out: str) -> str:
  return "".join(l for l in out.splitlines(keepends=True) if QUIET not in l)


def launch(command: list, num_processes: int, deadline_s: float) -> int:
  """Run ``command`` (argv) as ``num_processes`` processes; the largest exit code."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device per process
  base = command + ["--coordinator", f"127.0.0.1:{free_port()}",
                    "--processes", str(num_processes)]
  procs = [subprocess.Popen(base + ["--rank", str(r)], env=env,
                            stdout=None if r == 0 else subprocess.PIPE,
                            stderr=subprocess.PIPE if r == 0 else subprocess.STDOUT,
                            text=True, errors="replace")
           for r in range(num_processes)]
  relay = threading.Thread(target=_forward, args=(procs[0].stderr, sys.stderr), daemon=True)
  relay.start()  # rank 0's stderr, live
  deadline = time.monotonic() + deadline_s
  try:
    outs = [None] + [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0]
                     for p in procs[1:]]
    procs[0].wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    print(f"error: the run did not finish within {deadline_s:g} s (--deadline); killed",
          file=sys.stderr)
    return 1
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    relay.join(timeout=5)
  for r, (p, out) in enumerate(zip(procs, outs)):
    if p.returncode and out:
      print(f"--- process {r} exited with {p.returncode}:\n{_quiet(out)[-3000:]}",
            file=sys.stderr)
  return max(abs(p.returncode) for p in procs)


def run(a, argv: list, command: list, run_process, deadline_s: float) -> int:
  """A script's entry: without ``--rank``, start ``a.workers + 1`` processes of
  ``command + argv`` on this host; with it (and ``--coordinator``, ``--processes``), be
  that one process: ``run_process(a)``."""
  if a.rank is None:
    if a.coordinator is not None:
      print("error: --coordinator needs --rank (and --processes)", file=sys.stderr)
      return 2
    return launch(command + list(argv), a.workers + 1, deadline_s)
  if a.coordinator is None or a.processes is None:
    print("error: --rank needs --coordinator host:port and --processes N+1", file=sys.stderr)
    return 2
  return run_process(a)
