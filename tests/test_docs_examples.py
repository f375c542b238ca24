"""Every Python example in README.md and docs/*.md runs, and the docs site builds.

How the examples are collected:

- A block fenced as ```` ```python ```` (or ```` ```py ````) is an example. Fences may be indented,
  as inside an admonition; the common indentation is removed.
- The blocks of one page run in order in one shared namespace, so a later block may use the names
  an earlier block defined. Each page starts from an empty namespace.
- To keep a block out of the run, put the line ``<!-- notest -->`` directly above its opening fence
  (blank lines between the two are allowed). The marker is an HTML comment, so it is invisible on
  the rendered site and on GitHub, and the block is still highlighted as Python. Use it only for
  code that cannot run here (shell commands, a sketch with placeholders), never to hide a failing
  example. Blocks fenced with another language (``bash``, ``text``, ...) are not run either.
- Tracebacks point at the markdown file and its line numbers.

Examples must be quick (well under a second each), use no network, and write files only under a
temporary directory.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _util import fenced_blocks

ROOT = Path(__file__).resolve().parent.parent
NOTEST_MARKER = "<!-- notest -->"

_PYTHON_INFO = re.compile(r"^(?:python|py)(?:[ \t]|$)")


# Pages whose examples import JAX, PyTorch or dask: seconds each, so they run with the slow tests.
_HEAVY_PAGES = {"jax.md", "pytorch.md", "scaling-out.md"}


def _pages() -> list[Path]:
    pages = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    pages += sorted((ROOT / "docs").glob("*.md"))
    return pages


def _page_params() -> list[Any]:
    return [
        pytest.param(page, marks=pytest.mark.slow) if page.name in _HEAVY_PAGES else page
        for page in _pages()
    ]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Returns ``(first line number, code)`` for each runnable Python block of a markdown text.

    Line numbers are 1-based and point at the first line of code, after the opening fence.
    Blocks marked with ``NOTEST_MARKER`` and blocks in other languages are left out.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    for block in fenced_blocks(text):
        previous = block.opening - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        skipped = previous >= 0 and lines[previous].strip() == NOTEST_MARKER
        if _PYTHON_INFO.match(block.info) and not skipped:
            code = textwrap.dedent("\n".join(block.lines))
            blocks.append((block.opening + 2, code + "\n"))
    return blocks


@pytest.mark.parametrize("page", _page_params(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_examples_run(page: Path) -> None:
    """Runs the Python blocks of one page in order, in one namespace.

    A page whose examples need optional libraries says so in a comment, ``<!-- requires: jax
    array_api_compat -->``; where one is missing, the page is skipped.
    """
    relative = page.relative_to(ROOT).as_posix()
    text = page.read_text(encoding="utf-8")
    for needed in re.findall(r"<!-- requires: ([\w .]+) -->", text):
        for module in needed.split():
            pytest.importorskip(module, reason=f"{relative}'s examples need {module}")
    namespace: dict[str, object] = {"__name__": f"docs_example_{page.stem}"}
    for first_line, code in python_blocks(text):
        # Pad with blank lines so that tracebacks give the line number in the markdown file.
        source = "\n" * (first_line - 1) + code
        exec(compile(source, relative, "exec"), namespace)


def test_python_blocks_collector() -> None:
    """The collector finds fenced Python blocks, honours the marker and keeps line numbers."""
    text = textwrap.dedent(
        """\
        # Title

        ```python
        a = 1
        ```

        <!-- notest -->
        ```python
        raise RuntimeError("not run")
        ```

        ```bash
        echo not python
        ```

        !!! note
            ```py
            b = a + 1
            ```

        ````python
        c = "```"
        ````
        """
    )
    assert python_blocks(text) == [(4, "a = 1\n"), (18, "b = a + 1\n"), (22, 'c = "```"\n')]
    with pytest.raises(ValueError, match=r"line 1: the fence '```' is never closed"):
        python_blocks("```python\nx = 1\n")


def _missing_docs_tools() -> list[str]:
    modules = [
        "mkdocs",
        "material",
        "mkdocstrings",
        "mkdocstrings_handlers.python",
        "griffe_fieldz",
        "math_core",
        "ruff",
    ]
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def _skip_without_docs_tools() -> None:
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(
            f"the docs tools are not installed (missing {', '.join(missing)}); "
            "install them with: pip install -e '.[docs]'"
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs site, built once with ``mkdocs build --strict``; its folder."""
    _skip_without_docs_tools()
    site_dir = tmp_path_factory.mktemp("site")
    environment = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site_dir),
        ],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def _prose(page_html: str) -> str:
    """The page's HTML without code, scripts and styles: where a formula would show as text."""
    return re.sub(r"<(pre|code|script|style)\b.*?</\1>", "", page_html, flags=re.DOTALL)


@pytest.mark.slow
def test_mkdocs_build_strict(site: Path) -> None:
    """``mkdocs build --strict`` succeeds: no broken link, no unresolved API reference."""
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()
    assert not (site / "hooks").exists()  # the build's own code is not published


@pytest.mark.slow
def test_formulas_are_typeset_to_mathml_with_no_script(site: Path) -> None:
    """Every formula is MathML in the built HTML: nothing is left for a script from the network."""
    algorithm = _page(site, "algorithm")
    assert algorithm.count("<math") >= 20
    assert '<math display="block"><mtable' in algorithm  # the aligned steps, as a table
    for page in sorted(site.rglob("*.html")):
        text = _prose(page.read_text(encoding="utf-8"))
        where = page.relative_to(site).as_posix()
        for raw in ["\\(", "\\[", "\\begin{", "\\frac", "\\hat"]:
            assert raw not in text, f"{where}: raw TeX {raw!r} left in the page"
        assert "mathjax" not in text.lower(), where
        assert not re.search(r"<script[^>]+src=\"https?:", page.read_text(encoding="utf-8")), where


@pytest.mark.slow
def test_pages_load_nothing_from_other_hosts(site: Path) -> None:
    """No stylesheet, font or script comes from the network: the pages read the same offline
    and tell no one who reads them (the theme's Google Fonts are off)."""
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        where = page.relative_to(site).as_posix()
        assert not re.search(r"<(?:link|script)\b[^>]+(?:href|src)=\"(?:https?:)?//", text), where
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, where


@pytest.mark.slow
def test_long_signatures_are_wrapped_to_fit_the_page(site: Path) -> None:
    """mkdocstrings formats the signatures (with Ruff) to ``line_length`` from mkdocs.yml."""
    api = _page(site, "api")
    signatures = re.findall(r'doc-signature highlight"><pre>(.*?)</pre>', api, flags=re.DOTALL)
    assert len(signatures) >= 5
    lines = [
        line
        for signature in signatures
        for line in html.unescape(re.sub(r"<[^>]+>", "", signature)).splitlines()
    ]
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert "adam_update(\n    params: " in "\n".join(lines)


@pytest.mark.slow
def test_demo_page_shows_the_figure(site: Path) -> None:
    demo = _page(site, "demo")
    assert '<img alt="' in demo and 'src="../rosenbrock.png"' in demo
    assert (site / "rosenbrock.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _mathml_hook() -> Any:
    spec = importlib.util.spec_from_file_location("mathml_hook", ROOT / "docs/hooks/mathml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mathml_hook_replaces_the_tex_of_arithmatex() -> None:
    _skip_without_docs_tools()
    hook = _mathml_hook()
    page = (
        '<p>with <span class="arithmatex">\\(a &lt; b\\)</span> and</p>\n'
        '<div class="arithmatex">\\[\n\\begin{aligned} x &amp;= 1 \\\\ y &amp;= 2 '
        "\\end{aligned}\n\\]</div>"
    )
    typeset = hook.typeset(page)
    assert typeset.startswith('<p>with <span class="arithmatex"><math><mi>a</mi><mo>&lt;</mo>')
    assert '<div class="arithmatex"><math display="block"><mtable' in typeset
    assert "\\" not in typeset and "&amp;" not in typeset


def test_mathml_hook_names_the_page_of_a_bad_formula() -> None:
    _skip_without_docs_tools()
    hook = _mathml_hook()
    with pytest.raises(
        Exception, match=r"algorithm\.md: cannot typeset the formula '\\\\frac\{1\}'"
    ):
        hook.typeset('<span class="arithmatex">\\(\\frac{1}\\)</span>', where="algorithm.md")
