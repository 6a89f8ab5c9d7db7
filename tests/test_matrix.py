"""README's feature matrix is what the transforms do: each cell built and run
(tests/feature_matrix.py), and every refusal is an error at construction that names
the argument."""
import os

import optax
import pytest

import feature_matrix
import wagrad

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.slow
def test_readme_matrix_is_the_battery():
  text = open(README).read()
  lines = text[text.index("### Feature matrix"):].splitlines()
  first = next(i for i, l in enumerate(lines) if l.startswith("|"))
  end = next(i for i in range(first, len(lines)) if not lines[i].startswith("|"))
  assert "\n".join(lines[first:end]) == feature_matrix.table().strip()


def test_a_refused_feature_is_refused_by_name():
  """A "no" cell is an error at construction that names the argument, never an option
  that does nothing."""
  with pytest.raises(TypeError, match="'compression'.*keyword arguments: pull"):
    wagrad.lsgd(optax.sgd(0.1), 2, compression="int8")
  with pytest.raises(TypeError, match="num_fragments"):
    wagrad.easgd(optax.sgd(0.1), 2, num_fragments=2)
