"""The seed notebook keeps working with ``adam_functional.Adam`` in place of its own class.

The notebook (``adam_from_scratch_notebook.txt``) is a text export: a code cell starts after a line
``In [None]:`` and runs until the next markdown heading (a line starting with ``## ``) or the next
``In [None]:``. Every code cell after the class definition is run twice, each time in a fresh
namespace that first ran the imports cell: once with the notebook's own ``Adam`` class and once
with ``from adam_functional import Adam`` instead. What the two runs print must be the same text.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

NOTEBOOK_NAME = "adam_from_scratch_notebook.txt"
NOTEBOOK_ENV = "ADAM_FUNCTIONAL_NOTEBOOK"
# The notebook is not part of the repository; by default it is looked for beside it.
DEFAULT_NOTEBOOK = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / NOTEBOOK_NAME

CELL_START = "In [None]:"
HEADING = "## "
PACKAGE_ADAM = "from adam_functional import Adam\n"

# NumPy's documented defaults, so that the printed text does not depend on what ran before.
DEFAULT_PRINT_OPTIONS: dict[str, Any] = {
    "edgeitems": 3,
    "threshold": 1000,
    "floatmode": "maxprec",
    "precision": 8,
    "suppress": False,
    "linewidth": 75,
    "nanstr": "nan",
    "infstr": "inf",
    "sign": "-",
    "formatter": None,
    "legacy": False,
}


class Cell(NamedTuple):
    """One code cell: the markdown heading above it, its source and its first line number."""

    heading: str
    source: str
    line: int


def parse_cells(text: str) -> list[Cell]:
    """Splits the notebook text into its code cells, in order."""
    cells: list[Cell] = []
    heading = ""
    body: list[str] | None = None  # None while in markdown
    start = 0

    def close() -> None:
        if body is not None:
            cells.append(Cell(heading, "\n".join(body).strip("\n") + "\n", start))

    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() == CELL_START:
            close()
            body, start = [], number + 1
        elif line.startswith(HEADING):
            close()
            body, heading = None, line[len(HEADING) :].strip()
        elif body is not None:
            body.append(line)
    close()
    return cells


class Notebook(NamedTuple):
    imports: Cell
    adam_class: Cell
    examples: list[Cell]


def split_notebook(cells: list[Cell]) -> Notebook:
    """Finds the imports cell, the ``Adam`` class cell and the example cells after it."""
    class_index = next(i for i, cell in enumerate(cells) if "class Adam" in cell.source)
    return Notebook(cells[0], cells[class_index], cells[class_index + 1 :])


def notebook_path() -> Path:
    """The notebook's path: ``$ADAM_FUNCTIONAL_NOTEBOOK`` if set, else beside the checkout."""
    return Path(os.environ.get(NOTEBOOK_ENV) or DEFAULT_NOTEBOOK)


NOTEBOOK = notebook_path()
MISSING_REASON = (
    f"the seed notebook {NOTEBOOK_NAME} is not part of the package's source distribution; "
    f"this test runs where it is available (set {NOTEBOOK_ENV} to its path)"
)
CELLS = parse_cells(NOTEBOOK.read_text(encoding="utf-8")) if NOTEBOOK.is_file() else []


@pytest.fixture
def notebook() -> Notebook:
    if not NOTEBOOK.is_file():
        if os.environ.get(NOTEBOOK_ENV):
            pytest.fail(f"{NOTEBOOK_ENV}={NOTEBOOK} does not name a file")
        pytest.skip(MISSING_REASON)
    return split_notebook(CELLS)


@pytest.fixture(autouse=True)
def default_print_options() -> Iterator[None]:
    with np.printoptions(**DEFAULT_PRINT_OPTIONS):
        yield


@pytest.fixture(autouse=True)
def keep_global_random_state() -> Iterator[None]:
    # The cells seed NumPy's legacy global generator; other tests must not see that.
    state = np.random.get_state()  # noqa: NPY002
    yield
    np.random.set_state(state)  # noqa: NPY002


def run_cell(notebook: Notebook, example: Cell, adam_source: str) -> str:
    """Runs the imports cell, ``adam_source`` and ``example``; returns what ``example`` printed."""
    namespace: dict[str, Any] = {"__name__": "__notebook__"}
    setup = [(notebook.imports, notebook.imports.source), (notebook.adam_class, adam_source)]
    for cell, source in setup:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, f"<notebook line {cell.line}>", "exec"), namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example.source, f"<notebook line {example.line}>", "exec"), namespace)
    return printed.getvalue()


def cell_name(cell: Cell) -> str:
    """A test id: the cell's first comment line if it has one, else its heading."""
    first = cell.source.splitlines()[0]
    title = first[2:] if first.startswith("# ") else cell.heading
    return re.sub(r"\W+", "-", title.lower()).strip("-")


def example_ids() -> list[Any]:
    if not CELLS:
        return [pytest.param(-1, id="notebook-missing")]
    examples = split_notebook(CELLS).examples
    return [pytest.param(i, id=cell_name(cell)) for i, cell in enumerate(examples)]


def test_parser_finds_the_class_and_the_examples(notebook: Notebook) -> None:
    assert "import numpy as np" in notebook.imports.source
    assert notebook.adam_class.source.startswith("class Adam:")
    assert "def step(self, params, grads):" in notebook.adam_class.source
    assert len(notebook.examples) >= 4
    for cell in notebook.examples:
        assert "Adam(" in cell.source
        assert CELL_START not in cell.source
        assert not any(line.startswith(HEADING) for line in cell.source.splitlines())


def test_parser_splits_at_headings_and_cell_markers() -> None:
    text = (
        "# Title\n\nIn [None]:\nx = 1\n# a comment, not a heading\n\n\n## Next\nprose\n\n"
        "In [None]:\ny = 2\nIn [None]:\nz = 3\n"
    )
    assert parse_cells(text) == [
        Cell("", "x = 1\n# a comment, not a heading\n", 4),
        Cell("Next", "y = 2\n", 12),
        Cell("Next", "z = 3\n", 14),
    ]


@pytest.mark.parametrize("index", example_ids())
def test_cell_prints_the_same_with_the_package_adam(notebook: Notebook, index: int) -> None:
    example = notebook.examples[index]
    expected = run_cell(notebook, example, notebook.adam_class.source)
    actual = run_cell(notebook, example, PACKAGE_ADAM)
    assert expected.strip()
    assert actual.splitlines() == expected.splitlines()
    assert actual == expected
