"""`{evd-manual} PAGE`: a manual page's body, as `evd man PAGE --rst` writes
it from evd's own parser and configuration schema.

The HTML reference and the manual pages are one text: this directive parses
what evd.cli.manual generates, so a page here cannot say less than the
installed `evd man`.
"""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

from evd.cli import build_parser, manual


class EvdManual(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        page = self.arguments[0]
        if page not in manual.PAGES:
            raise self.error(f"unknown manual page {page!r} (choose from {', '.join(manual.PAGES)})")
        text = manual.body(page, build_parser())
        holder = nodes.section()
        holder.document = self.state.document
        nested_parse_with_titles(self.state, StringList(text.splitlines(), source=f"evd man {page}"), holder)
        return holder.children


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("evd-manual", EvdManual)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
