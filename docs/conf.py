"""Sphinx configuration of pnode's documentation (built with ``-W``: warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # document this checkout, not an installed copy

project = "pnode"
author = "the pnode developers"
copyright = "2026, the pnode developers"
release = version = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.viewcode", "numpydoc"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc sections carry the types
# numpydoc: class member tables would duplicate the autodoc members below each class
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# Some docstrings name types informally ("sequence of float", "Tensor"); do not cross-check them.
nitpicky = False
