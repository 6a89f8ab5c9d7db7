"""Every docstring example in wagrad runs as written (doctest), and there are some."""
import doctest
import importlib
import pkgutil

import pytest

import wagrad._src

MODULES = sorted(m.name for m in pkgutil.iter_modules(wagrad._src.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(f"wagrad._src.{name}")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           report=True)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def test_the_transforms_have_examples():
  attempted = 0
  for name in MODULES:
    module = importlib.import_module(f"wagrad._src.{name}")
    finder = doctest.DocTestFinder()
    attempted += sum(len(t.examples) for t in finder.find(module))
  assert attempted >= 50, attempted
