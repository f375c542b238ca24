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

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEST_MARKER = "<!-- notest -->"

_FENCE_OPEN = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_PYTHON_INFO = re.compile(r"^(?:python|py)(?:[ \t]|$)")


def _pages() -> list[Path]:
    pages = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    pages += sorted((ROOT / "docs").glob("*.md"))
    return pages


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Returns ``(first line number, code)`` for each runnable Python block of a markdown text.

    Line numbers are 1-based and point at the first line of code, after the opening fence.
    Blocks marked with ``NOTEST_MARKER`` and blocks in other languages are left out.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"line {index + 1}: the fence {fence!r} is never closed")
        previous = index - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        skipped = previous >= 0 and lines[previous].strip() == NOTEST_MARKER
        if _PYTHON_INFO.match(opening["info"].strip()) and not skipped:
            code = textwrap.dedent("\n".join(lines[index + 1 : end]))
            blocks.append((index + 2, code + "\n"))
        index = end + 1
    return blocks


@pytest.mark.parametrize("page", _pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_examples_run(page: Path) -> None:
    """Runs the Python blocks of one page in order, in one namespace."""
    relative = page.relative_to(ROOT).as_posix()
    namespace: dict[str, object] = {"__name__": f"docs_example_{page.stem}"}
    for first_line, code in python_blocks(page.read_text(encoding="utf-8")):
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


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds: no broken link, no unresolved API reference."""
    missing = _missing_docs_tools()
    if missing:
        pytest.skip(
            f"the docs tools are not installed (missing {', '.join(missing)}); "
            "install them with: pip install -e '.[docs]'"
        )
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
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()
