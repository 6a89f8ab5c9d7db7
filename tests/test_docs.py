"""The API reference (docs/api, Sphinx autodoc) builds with warnings as errors and
lists every public name of wagrad."""
import glob
import html
import os
import re
import subprocess
import sys

import wagrad

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "api")


def test_every_public_name_has_its_entry():
  text = "".join(open(f).read() for f in glob.glob(os.path.join(DOCS, "*.rst")))
  documented = set(re.findall(r"^\.\. auto(?:function|class):: wagrad\.(\w+)", text, re.M))
  public = {n for n in dir(wagrad) if not n.startswith("_")}
  assert public <= documented, sorted(public - documented)


def test_api_reference_builds_without_warnings(tmp_path):
  p = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                      DOCS, str(tmp_path)], capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  page = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "easgd.html").read_text()))
  assert "x~ + alpha sum_i (x_i - x~)" in page  # the rule is on the family's page


def test_ruff_passes():
  """The lint configuration in pyproject.toml ([tool.ruff]) holds for the whole tree."""
  root = os.path.dirname(DOCS.rstrip(os.sep)).rsplit(os.sep, 1)[0]
  p = subprocess.run([sys.executable, "-m", "ruff", "check", "wagrad", "tests", "benchmarks",
                      "examples", "docs"], cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_declared_minimums_are_the_ones_ci_tests():
  """pyproject.toml's lower bounds for jax, flax, optax and chex are exactly the pins
  of .ci/minimum.txt, which CI runs the whole suite with."""
  root = os.path.dirname(os.path.dirname(DOCS))
  with open(os.path.join(root, ".ci", "minimum.txt")) as f:
    pins = dict(re.findall(r"^([a-z]+)==([\d.]+)$", f.read(), re.M))
  with open(os.path.join(root, "pyproject.toml")) as f:
    floors = dict(re.findall(r'"([a-z]+)>=([\d.]+)"', f.read()))
  for name in ("jax", "flax", "optax", "chex"):
    assert floors[name] == pins[name], name
  assert pins["jaxlib"] == pins["jax"]
