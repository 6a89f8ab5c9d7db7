"""The README's Flax loops (NNX with nnx.Optimizer, linen with a TrainState that
forwards value=) run as they are written there, and train: each ends by printing the
evaluated model's squared error, which must be far below the targets' variance (8)."""
import contextlib
import io
import os
import re
import warnings

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _flax_blocks():
  text = open(README).read()
  section = text[text.index("## Flax"):text.index("## CIFAR on GPUs")]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_has_the_two_flax_loops():
  blocks = _flax_blocks()
  assert len(blocks) == 2
  assert "nnx.Optimizer" in blocks[0] and "train_state.TrainState" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["nnx", "linen"])
def test_readme_flax_loop_runs_and_trains(index):
  out = io.StringIO()
  with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    exec(compile(_flax_blocks()[index], f"README.md flax block {index}", "exec"), {})
  mse = float(out.getvalue().split()[-1])
  assert mse < 0.5, out.getvalue()
  # no deprecation a user cannot act on (flax 0.12 deprecates nnx.State.to_pure_dict)
  deprecated = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                and "flax" in str(w.message).lower() + w.filename]
  assert not deprecated, deprecated
