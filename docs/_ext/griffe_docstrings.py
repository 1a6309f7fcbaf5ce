"""Griffe extension for the docs build: adapt the code base's docstrings to Markdown.

* ``Example:`` (singular) section titles become ``Examples:``. Griffe's Google parser
  only turns ``Examples:`` into a doctest section; ``Example:`` becomes an admonition
  whose ``>>>`` lines render as nested block quotes.
* Sphinx roles (``:class:`MAML```, ``:func:`~pkg.mod.f```) become inline code
  (``MAML``, ``f``); Markdown would show the role text literally.

Only what the documentation shows changes; the source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def to_markdown(text: str) -> str:
    """The docstring text with the two rewrites above applied."""
    return _ROLE.sub(_role, _TITLE.sub(r"\1Examples:", text))


class MarkdownDocstrings(griffe.Extension):
    """Apply :func:`to_markdown` to every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        docstring = obj.docstring
        if docstring is not None:
            docstring.value = to_markdown(docstring.value)
