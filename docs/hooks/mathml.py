"""Typesets the docs' formulas as MathML when the site is built, so that they need no script.

``pymdownx.arithmatex`` (generic mode) finds the formulas in the Markdown and leaves each one as
TeX in ``<span class="arithmatex">\\(...\\)</span>`` or ``<div class="arithmatex">\\[...\\]</div>``.
This hook replaces the TeX inside with MathML Core from ``math_core`` (the ``[docs]`` extra),
which current browsers draw natively: a page shows its formulas with no script, no font to fetch
and no network. A formula that ``math_core`` cannot read fails the build, naming the page.
"""

from __future__ import annotations

import html
import re
from typing import Any

from math_core import LatexError, LatexToMathML
from mkdocs.exceptions import PluginError

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">'
    r"(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])"
    r"</(?P=tag)>",
    re.DOTALL,
)
_CONVERTER = LatexToMathML()


def typeset(page_html: str, *, where: str = "the page") -> str:
    """Returns ``page_html`` with each arithmatex formula's TeX replaced by MathML.

    Raises:
      PluginError: a formula is not valid TeX for ``math_core``; the message names ``where``.
    """

    def replace(match: re.Match[str]) -> str:
        tex = html.unescape(match["tex"]).strip()
        display = match["open"] == "\\["
        try:
            mathml = _CONVERTER.convert_with_local_state(tex, displaystyle=display)
        except LatexError as error:
            raise PluginError(f"{where}: cannot typeset the formula {tex!r}:\n{error}") from None
        return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'

    return _FORMULA.sub(replace, page_html)


def on_page_content(page_html: str, page: Any, **kwargs: Any) -> str:
    """mkdocs hook: typesets the formulas of each page, docstrings included."""
    return typeset(page_html, where=page.file.src_uri)
