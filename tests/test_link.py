"""benchmarks/link.py: reading links everywhere; where shaping works here (root, unshare,
tc, the kernel's tbf, and netem for delay), physical lower bounds on the shaped loopback
between two processes: a transfer takes at least (bytes - tbf's bucket) / rate, a round
trip at least 2 x delay. Where a link cannot be shaped, the CLI and run() refuse it."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import link  # noqa: E402
from link import Link  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "link.py")


def need(shaped: Link) -> None:
  if reason := link.unavailable_reason(shaped):
    pytest.skip(f"cannot shape {shaped} here: {reason}")


def test_parse_profiles_and_units():
  assert Link.parse("datacenter") == Link(10e9, 0.1)
  assert Link.parse("cross-zone") == Link(1e9, 5.0) == Link.parse("1gbit,5ms")
  assert Link.parse("cross-region") == Link(100e6, 30.0)
  assert Link.parse("100mbit,30ms,2ms") == Link(100e6, 30.0, 2.0)
  assert Link.parse("1gbit") == Link(1e9)
  assert Link.parse("250kbit, 500us") == Link(250e3, 0.5)
  assert Link.parse("2.5Gbit,0.1ms,20us") == Link(2.5e9, 0.1, 0.02)
  assert [p.rate_name for p in link.PROFILES.values()] == ["10gbit", "1gbit", "100mbit"]


@pytest.mark.parametrize("bad", ["", "fast", "1gb,5ms", "1gbit,5", "5ms", "0mbit",
                                 "1gbit,5ms,1ms,1ms", "1gbit,5mbit"])
def test_parse_rejects_with_an_example(bad):
  with pytest.raises(ValueError, match="1gbit,5ms"):
    Link.parse(bad)


def test_shaped_command_runs_the_command_verbatim_under_tbf_or_netem():
  cmd = ["python", "-c", "print('a b; $HOME')"]
  argv = link.shaped_command(cmd, Link(8e6, 20.0, 1.0))
  assert argv[:4] == ["unshare", "-n", "sh", "-c"] and argv[-3:] == cmd
  assert "netem" in argv[4] and "delay 20000us 1000us rate 8000000bit" in argv[4]
  rate_only = link.shaped_command(cmd, Link(1e9))[4]
  assert "tbf rate 1000000000bit burst 131072 limit 12500000" in rate_only, rate_only


def test_transfer_takes_at_least_bytes_over_rate():
  nbytes, rate, bucket = 1_000_000, 8e6, 128 << 10  # 0.87 s at least
  need(Link(rate))
  slow = link.measure(Link(rate), nbytes, timeout=20)
  assert slow["seconds"] >= 0.95 * (nbytes - bucket) * 8 / rate, slow
  fast = link.measure(Link(10e9), nbytes, timeout=20)  # all in tbf's bucket: unshaped
  assert fast["seconds"] < slow["seconds"], (fast, slow)


def test_round_trip_takes_at_least_twice_the_delay():
  need(Link(1e9, 20.0))
  r = link.measure(Link(1e9, 20.0), 1000, timeout=20)
  assert r["rtt_ms"] >= 2 * 20.0, r


def test_cli_runs_the_command_over_the_link_with_its_exit_code():
  need(Link(100e6))
  code = ("import subprocess, sys; q = subprocess.run(['tc', 'qdisc', 'show', 'dev', 'lo'],"
          " capture_output=True, text=True, timeout=10).stdout; print(q); sys.exit(3)")
  p = subprocess.run([sys.executable, SCRIPT, "--link", "100mbit", "--",
                      sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
  assert p.returncode == 3, p.stderr
  assert "qdisc tbf" in p.stdout and "rate 100Mbit" in p.stdout, p.stdout


def test_a_link_that_cannot_be_shaped_here_is_refused_with_the_reason():
  delayed = Link(1e9, 5.0)
  if not (reason := link.unavailable_reason(delayed)):
    pytest.skip("a link with delay can be shaped here: nothing to refuse")
  p = subprocess.run([sys.executable, SCRIPT, "--link", "cross-zone", "--", "true"],
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and reason in p.stderr and not p.stdout, p
  with pytest.raises(RuntimeError, match="cannot shape"):
    link.run(["true"], delayed, timeout=10)
