"""Sphinx configuration for evd's documentation (HTML and manual pages).

Pages are MyST Markdown.  The guide, design and performance folders are read
through glob toctrees (index.md), so a page dropped into one of them is part
of the build without an edit here.  `sphinx-build -W` runs in CI: a broken
reference or a page missing from every toctree is an error, not a warning.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the reference pages are generated from evd's own parser and schema
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

import evd  # noqa: E402

project = "evd"
author = "evd maintainers"
copyright = "evd maintainers"
release = evd.__version__
version = release

extensions = ["myst_parser", "evdref"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", ".venv"]
# Headings become link targets ("#tls-and-client-certificates"), so pages can
# link into each other's sections.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"evd {release}"

# `sphinx-build -b man` writes the two reference pages as manual pages too;
# an installed evd prints the same pages itself (`evd man`).
man_pages = [
    ("reference/cli", "evd", "small network services on one event loop", [author], 8),
    ("reference/configuration", "evd.toml", "the configuration of evd", [author], 5),
]
