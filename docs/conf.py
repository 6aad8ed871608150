"""Sphinx configuration for agr_optim."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import agr_optim  # noqa: E402
from agr_optim._citation import CITATION, TITLE, VENUE  # noqa: E402

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

# The paper's title and BibTeX come from agr_optim._citation, the one place they are written:
# |paper| in any page, and the directive ``.. agr-citation::`` for the BibTeX block.
rst_epilog = f"""
.. |paper| replace:: Tong et al., *{TITLE}*, {VENUE}
"""


def setup(app):
    from docutils import nodes
    from sphinx.util.docutils import SphinxDirective

    class CitationDirective(SphinxDirective):
        """The paper's BibTeX (``agr_optim.CITATION``) as a literal block."""

        has_content = False

        def run(self):
            block = nodes.literal_block(CITATION, CITATION)
            block["language"] = "bibtex"
            return [block]

    app.add_directive("agr-citation", CitationDirective)
    return {"parallel_read_safe": True}
