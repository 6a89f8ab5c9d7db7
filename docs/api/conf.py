"""Sphinx configuration of wagrad's API reference (``docs/api``).

Build: ``python -m sphinx -W -b html docs/api docs/api/_build`` (the test suite builds
it with warnings as errors, ``tests/test_docs.py``)."""
project = "wagrad"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"
html_theme = "alabaster"
exclude_patterns = ["_build"]
