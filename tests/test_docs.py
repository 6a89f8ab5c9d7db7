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
  """Every name of ``wagrad`` and of its public namespaces (``wagrad.schedules``,
  ``wagrad.collectives``, ``wagrad.async_``) has its entry, and the top level stays
  small (at most 40 names)."""
  import types

  import wagrad.async_
  text = "".join(open(f).read() for f in glob.glob(os.path.join(DOCS, "*.rst")))
  documented = set(re.findall(r"^\.\. auto(?:function|class):: wagrad\.([\w.]+)", text, re.M))
  top = {n for n in dir(wagrad) if not n.startswith("_")}
  modules = {n for n in top if isinstance(getattr(wagrad, n), types.ModuleType)}
  assert modules <= {"schedules", "collectives", "async_"}, modules
  public = (top - modules) | {f"{m}.{n}" for m in ("schedules", "collectives", "async_")
                              for n in getattr(wagrad, m).__all__}
  assert public <= documented, sorted(public - documented)
  assert len(top) <= 40, sorted(top)


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


ROOT = os.path.dirname(os.path.dirname(DOCS))


def test_mypy_passes():
  """The type hints hold ([tool.mypy] in pyproject.toml: the package, optax's and
  orbax's missing markers ignored)."""
  p = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_wheel_builds_without_warnings_and_installs(tmp_path):
  """A non-editable wheel: built offline with the installed setuptools, free of
  warnings, carrying ``py.typed`` and the one version; installed into a fresh
  virtualenv it imports from there (the test environment's packages serve as its
  dependencies through PYTHONPATH, which does not see the editable install)."""
  import shutil
  import sysconfig
  import venv
  import zipfile
  src = tmp_path / "src"  # a copy: the build writes build/ and egg-info beside the sources
  shutil.copytree(os.path.join(ROOT, "wagrad"), src / "wagrad",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "warning" not in (p.stdout + p.stderr).lower(), p.stdout[-3000:] + p.stderr[-3000:]
  (wheel,) = (tmp_path / "dist").glob("wagrad-*.whl")
  assert wheel.name.startswith(f"wagrad-{wagrad.__version__}-")
  names = zipfile.ZipFile(wheel).namelist()
  assert "wagrad/py.typed" in names and "wagrad/async_.py" in names
  assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=False).create(env_dir)
  py = str(env_dir / "bin" / "python")
  p = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps",
                      "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"], JAX_PLATFORMS="cpu")
  p = subprocess.run([py, "-c", "import wagrad, wagrad.async_; print(wagrad.__file__); "
                      "print(wagrad.__version__)"], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  where, version = p.stdout.split()
  assert where.startswith(str(env_dir)) and version == wagrad.__version__
