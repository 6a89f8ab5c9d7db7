"""Run a command, and every process it starts, over an emulated network link.

The command runs in a fresh network namespace whose only interface is a loopback shaped
by one qdisc, so processes talking over 127.0.0.1 measure on a slow link:

  python benchmarks/link.py --check     # what can be shaped here? measures each profile
  python benchmarks/link.py --link cross-zone -- python benchmarks/multiprocess.py ...
  python benchmarks/link.py --link 100mbit,30ms,2ms -- python my_bench.py

or ``run(cmd, Link.parse("cross-zone"), timeout=600)`` from Python.

A rate-only link (``"1gbit"``) is shaped by tbf, whose bucket (1 ms at the rate, 128 KiB
at least: two of lo's 64 KiB packets) lets a transfer's first bytes through unshaped. A
link with delay or jitter is shaped by netem (delay and rate), which delays each packet
once, on its way out of ``lo``; both directions of a 127.0.0.1 connection leave through
``lo``, so a round trip costs 2 x delay. Either way the rate is one budget for all traffic
on ``lo``, both directions and all connections together (half duplex), headers included.
Only IP traffic is shaped (not Unix sockets, pipes, shared memory), and nothing outside
the namespace is reachable. Needs root, ``unshare``, ``ip``, ``tc`` and sch_tbf, or
sch_netem for delay: ``unavailable_reason(link)`` says what is missing. ``--check``
measures the machine it runs on (a slow or busy CPU may not reach 10 Gbit/s): its numbers
hold there only, and none is claimed anywhere else.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

# Queues hold many connections' segments and ACKs (a drop on lo costs TCP a retransmission
# timeout): netem's counts packets (default 1000); tbf's bytes (100 ms at the rate, 4 MiB
# at least). Only packets actually queued take memory.
QUEUE_PACKETS = 100_000
_RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"ms": 1.0, "us": 1e-3}


@dataclasses.dataclass(frozen=True)
class Link:
  """``rate_bit`` bits/s shared by both directions; every packet delayed once by
  ``delay_ms`` +- ``jitter_ms`` (uniform, not reordered): a round trip is 2 x delay."""
  rate_bit: float
  delay_ms: float = 0.0
  jitter_ms: float = 0.0

  @classmethod
  def parse(cls, text: str) -> Link:
    """A name in ``PROFILES`` or ``RATE[,DELAY[,JITTER]]``: ``"1gbit,5ms"``,
    ``"100mbit,30ms,2ms"``, ``"1gbit"`` (units kbit, mbit, gbit; ms, us)."""
    if text.strip() in PROFILES:
      return PROFILES[text.strip()]
    first, *rest = text.lower().replace(" ", "").split(",")
    rate, times = _number(first, _RATE_UNITS), [_number(t, _TIME_UNITS) for t in rest]
    if not rate or len(times) > 2 or None in times:
      raise ValueError(f"cannot read the link {text!r}: give a profile ({', '.join(PROFILES)})"
                       " or RATE[,DELAY[,JITTER]] such as '1gbit,5ms' or '100mbit,30ms,2ms'")
    return cls(rate, *times)

  @property
  def delayed(self) -> bool:  # needs netem, not only tbf
    return bool(self.delay_ms or self.jitter_ms)

  @property
  def rate_name(self) -> str:  # as parse() reads it: "1gbit"
    unit = next((u for u in ("gbit", "mbit") if self.rate_bit >= _RATE_UNITS[u]), "kbit")
    return f"{self.rate_bit / _RATE_UNITS[unit]:g}{unit}"


def _number(text: str, units: dict[str, float]) -> float | None:
  m = re.fullmatch(r"(\d+\.?\d*|\.\d+)([a-z]+)", text)
  return float(m[1]) * units[m[2]] if m and m[2] in units else None


PROFILES = {
  "datacenter": Link(10e9, 0.1),
  "cross-zone": Link(1e9, 5.0),
  "cross-region": Link(100e6, 30.0),  # also a home link
}


def qdisc(link: Link) -> str:
  """The ``tc qdisc add dev lo root`` arguments: tbf for a rate alone, else netem."""
  rate = f"rate {round(link.rate_bit)}bit"
  if not link.delayed:
    burst = max(128 << 10, round(link.rate_bit / 8e3))  # bytes: 1 ms, 2 packets at least
    return f"tbf {rate} burst {burst} limit {max(4 << 20, round(link.rate_bit / 80))}"
  jitter = f" {round(link.jitter_ms * 1000)}us" if link.jitter_ms else ""
  return f"netem limit {QUEUE_PACKETS} delay {round(link.delay_ms * 1000)}us{jitter} {rate}"


def shaped_command(cmd: list[str], link: Link) -> list[str]:
  """The argv that runs ``cmd`` (exec'd: its signals and exit code are its own) in a fresh
  network namespace whose loopback is ``link``: one qdisc, ``qdisc(link)``."""
  script = f'ip link set lo up && tc qdisc add dev lo root {qdisc(link)} && exec "$@"'
  return ["unshare", "-n", "sh", "-c", script, "sh", *cmd]


def _error(cmd: list[str]) -> str | None:
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired) as e:
    return str(e)
  return (p.stderr.strip() or f"exit status {p.returncode}") if p.returncode else None


@functools.cache
def _qdisc_error(kind: str) -> str | None:
  """None where a ``kind`` ("tbf", "netem") qdisc can be added (tried once), else why not."""
  if os.geteuid() != 0:
    return "not root: a network namespace and its qdisc need root"
  if missing := [t for t in ("unshare", "ip", "tc") if shutil.which(t) is None]:
    return f"{' and '.join(missing)} not found on PATH (util-linux, iproute2)"
  if not (err := _error(shaped_command(["true"], Link(1e9, float(kind == "netem"))))):
    return None
  if "qdisc kind is unknown" in err:
    return f"this kernel has no {kind} qdisc (CONFIG_NET_SCH_{kind.upper()})"
  return f"cannot add a {kind} qdisc in a new network namespace: {err}"


def unavailable_reason(link: Link | None = None) -> str | None:
  """None where ``link`` (by default a rate-only one) can be shaped here, else why not. A
  rate-only link needs the tbf qdisc, one with delay netem; each is probed once."""
  if not (link and link.delayed):
    return _qdisc_error("tbf")
  if (err := _qdisc_error("netem")) and not _qdisc_error("tbf"):
    err += ": delay cannot be emulated here; rate-only links such as '1gbit' work"
  return err


def run(cmd: list[str], link: Link | str, **kwargs) -> subprocess.CompletedProcess:
  """``subprocess.run`` of ``cmd`` over ``link``; RuntimeError where it cannot be shaped."""
  link = Link.parse(link) if isinstance(link, str) else link
  if reason := unavailable_reason(link):
    raise RuntimeError(f"cannot shape the link {link}: {reason}")
  return subprocess.run(shaped_command(list(cmd), link), **kwargs)


def measure(link: Link, nbytes: int, timeout: float = 60) -> dict:
  """Two processes over ``link``: the best of 5 one-byte round trips (``rtt_ms``), then
  ``nbytes`` one way, from the first byte sent until the receiver's acknowledgement is
  back (``seconds``; ``mbit_s`` leaves out that one round trip). Plain sockets."""
  p = run([sys.executable, os.path.abspath(__file__), "--probe", str(nbytes)], link,
          capture_output=True, text=True, timeout=timeout, check=True)
  return json.loads(p.stdout)


def _recv(sock: socket.socket, n: int) -> None:
  buf = bytearray(min(n, 1 << 20))
  while n:
    if not (got := sock.recv_into(buf, min(n, len(buf)))):
      raise ConnectionError("peer closed early")
    n -= got


def _probe(nbytes: int, pings: int = 5) -> None:
  """measure()'s two processes: the child receives each message (the pings, then the
  bulk) and acknowledges it; the parent sends them, timing each until acknowledged."""
  sizes = [1] * pings + [nbytes]
  server = socket.create_server(("127.0.0.1", 0))
  if (pid := os.fork()) == 0:
    sock = server.accept()[0]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for n in sizes:
      _recv(sock, n)
      sock.sendall(b"k")
    os._exit(0)
  sock = socket.create_connection(server.getsockname())
  sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  chunk, times = memoryview(bytes(1 << 20)), []
  for n in sizes:
    t = time.perf_counter()
    while n:
      n -= sock.send(chunk[:n])
    _recv(sock, 1)
    times.append(time.perf_counter() - t)
  os.waitpid(pid, 0)
  rtt, seconds = min(times[:-1]), times[-1]
  print(json.dumps({"rtt_ms": rtt * 1e3, "seconds": seconds,
                    "mbit_s": nbytes * 8 / max(seconds - rtt, 1e-9) / 1e6}))


def _check() -> int:
  """Each profile, and its rate alone, measured where it can be shaped here."""
  print("two processes, TCP over the shaped loopback, measured on this machine:")
  failed = 0
  for pname, p in PROFILES.items():
    for name, link in ((pname, p), (f"{pname} rate only ({p.rate_name})", Link(p.rate_bit))):
      nbytes = max(1 << 20, int(link.rate_bit / 8 * 0.5))  # about half a second
      print(f"  {name:32s} {link.rate_bit / 1e6:5g} Mbit/s, {link.delay_ms:4g} ms each way: ",
            end="", flush=True)
      try:
        if reason := unavailable_reason(link):
          print(f"cannot run here: {reason}")
          continue
        r = measure(link, nbytes)
        print(f"round trip {r['rtt_ms']:6.2f} ms, bulk {r['mbit_s']:5.0f} Mbit/s "
              f"({nbytes / 1e6:g} MB in {r['seconds']:.2f} s)")
      except (subprocess.SubprocessError, ValueError) as e:
        print(f"failed: {e}")
        failed = 1
  return failed


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--probe"]:  # inside the namespace, for measure()
    return _probe(int(argv[1])) or 0
  split = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              usage="%(prog)s --check | --link LINK -- CMD [ARG ...]")
  p.add_argument("--link", help=f"a profile ({', '.join(PROFILES)}) or RATE[,DELAY[,JITTER]]")
  p.add_argument("--check", action="store_true", help="measure what can be shaped here")
  a, cmd = p.parse_args(argv[:split]), argv[split + 1:]
  if not a.check and not (a.link and cmd):
    p.error("give --check, or --link LINK -- CMD [ARG ...]")
  try:
    link = a.link and Link.parse(a.link)
  except ValueError as e:
    p.error(str(e))
  if reason := unavailable_reason(None if a.check else link):
    print(f"cannot shape {'any link' if a.check else repr(a.link)} here: {reason}",
          file=sys.stdout if a.check else sys.stderr)
    return 1 if a.check else 2
  if a.check:
    return _check()
  rc = run(cmd, link).returncode
  return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
  sys.exit(main())
