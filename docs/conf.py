"""Sphinx configuration for agr_optim."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import agr_optim  # noqa: E402

project = "agr_optim"
author = "agr_optim developers"
copyright = "2026, agr_optim developers"
release = agr_optim.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
nitpicky = False
html_theme = "alabaster"
html_static_path = ["_static"]
exclude_patterns = ["_build"]
