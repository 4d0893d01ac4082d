"""MkDocs hook: the docstrings' Sphinx cross-reference roles, rendered as links.

The docstrings are Google style, with Sphinx roles for cross-references (``:class:`~auxlab.HierarchyMask```,
``:meth:`loss```), which Markdown renders as the role's name followed by a code span. This hook turns each
into the code span alone (``~`` keeps the last component, as in Sphinx), linked through mkdocs-autorefs
when the target is a documented object (an optional reference: an unknown target stays plain code, with
no warning). It also drops the second colon of a reST literal-block marker (``Example::``), whose block
Markdown already renders as code. Only the generated HTML changes; no docstring is edited.
"""

from __future__ import annotations

import html
import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj|const):<code>(~?)([^<]+)</code>")
_LITERAL_MARKER = re.compile(r"::</p>")


def _link(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", html.unescape(match.group(2)).strip()
    identifier = target.removesuffix("()")
    title = identifier.rsplit(".", 1)[-1] if short else identifier
    return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'


def on_page_content(html_text: str, **kwargs: Any) -> str:
    return _LITERAL_MARKER.sub(":</p>", _ROLE.sub(_link, html_text))
