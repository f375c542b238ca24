"""The benchmark command runs, shows its progress, writes its JSON and plot, and its docs match it.

These tests check structure only: speed is what the benchmark reports, never what a test asserts.
torch, jax and optax are hidden from every run here, so the tests neither need them nor spend time
importing and compiling them.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_notebook import MISSING_REASON, NOTEBOOK, parse_cells, split_notebook

from adam_functional import bench
from adam_functional.bench import measure, notebook, report, sizes

ROOT = Path(__file__).resolve().parent.parent
NUMPY_IMPLEMENTATIONS = ["notebook", "adam_update", "Adam.step"]
QUICK_SIZES = ["2x2", "1e3", "mlp25-tiny"]
DTYPES = ["float64", "float32"]
TABLE_HEADER = "implementation size dtype us/step spread ratio first us extra MiB extra/params"

QuickRun = tuple[int, dict[str, Any], str]


@pytest.fixture
def without_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``import torch``, ``import jax`` and ``import optax`` fail, as when not installed."""
    for name in ("torch", "jax", "optax"):
        monkeypatch.setitem(sys.modules, name, None)


class _Capture(io.StringIO):
    """Standard output that is a terminal or not, as ``tty`` says."""

    def __init__(self, *, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One ``--quick --json`` run, into a pipe, shared by the tests that read its output."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("torch", "jax", "optax"):
            mp.setitem(sys.modules, name, None)
        capture = _Capture(tty=False)
        mp.setattr(sys, "stdout", capture)
        status = bench.main(["--quick", "--json", str(path)])
    return status, json.loads(path.read_text(encoding="utf-8")), capture.getvalue()


@pytest.mark.slow
def test_quick_run_succeeds(quick_run: QuickRun) -> None:
    status, _, _ = quick_run
    assert status == 0


@pytest.mark.slow
def test_json_structure(quick_run: QuickRun) -> None:
    _, data, _ = quick_run
    assert set(data) == {"meta", "results"}
    meta = data["meta"]
    assert meta["numpy"] == np.__version__
    assert meta["torch"] is None
    assert meta["jax"] is None
    assert isinstance(meta["cpu_count"], int)
    assert meta["cpu_count"] >= 1
    assert meta["implementations"] == NUMPY_IMPLEMENTATIONS
    assert meta["sizes"] == QUICK_SIZES
    assert meta["dtypes"] == DTYPES
    assert any("torch is not installed" in note for note in meta["notes"])
    assert meta["not_installed"] == ["torch", "jax", "optax"]
    assert meta["method"] == report.METHOD

    rows = data["results"]
    keys = {(r["implementation"], r["size"], r["dtype"]) for r in rows}
    assert keys == {
        (name, size, dtype)
        for name in NUMPY_IMPLEMENTATIONS
        for size in meta["sizes"]
        for dtype in meta["dtypes"]
    }
    assert len(rows) == len(keys)


@pytest.mark.slow
def test_every_row_has_positive_times(quick_run: QuickRun) -> None:
    _, data, _ = quick_run
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["median_us"] > 0
        assert row["min_us"] > 0
        assert row["spread"] >= 0
        assert row["first_call_us"] > 0
        assert len(row["samples_us"]) == measure.QUICK_REPEATS
        assert all(t > 0 for t in row["samples_us"])
        assert row["steps_per_sample"] >= 1
        assert row["ratio_vs_notebook"] > 0
        # NumPy implementations are measured with tracemalloc.
        assert row["memory_note"] == "tracemalloc"
        assert row["peak_extra_bytes"] >= 0


@pytest.mark.slow
def test_ratio_is_notebook_time_over_implementation_time(quick_run: QuickRun) -> None:
    _, data, _ = quick_run
    rows = data["results"]
    notebook_us = {
        (r["size"], r["dtype"]): r["median_us"] for r in rows if r["implementation"] == "notebook"
    }
    for row in rows:
        expected = notebook_us[row["size"], row["dtype"]] / row["median_us"]
        assert row["ratio_vs_notebook"] == pytest.approx(expected)


@pytest.mark.slow
def test_table_prints(quick_run: QuickRun) -> None:
    _, _, out = quick_run
    assert "backend:" in out
    assert "cores" in out
    assert "note: torch is not installed" in out
    assert "note: jax and optax not installed" in out
    lines = out.splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("implementation")]
    assert len(table) == 1
    assert lines[table[0]].split() == TABLE_HEADER.split()
    for name in NUMPY_IMPLEMENTATIONS:
        assert any(line.startswith(f"{name} ") for line in lines[table[0] :])
    assert re.fullmatch(r"18 rows in [0-9.]+ s", lines[-2])
    assert lines[-1].startswith("wrote ")
    assert lines[-1].endswith("results.json")


@pytest.mark.slow
def test_rows_print_as_they_complete(quick_run: QuickRun) -> None:
    # Into a pipe, every row is printed as its group completes, before the table.
    _, data, out = quick_run
    before_table = out[: out.index("\nimplementation ")].splitlines()
    progress = [line for line in before_table if ": us/step " in line]
    assert [line.split(":")[0].split() for line in progress] == [
        [r["implementation"], r["size"], r["dtype"]] for r in data["results"]
    ]
    first = progress[0]
    assert re.fullmatch(
        r"notebook 2x2 float64: us/step [0-9.,]+, spread [0-9]+%, ratio 1\.00, "
        r"first us [0-9.,]+, extra MiB [0-9.e-]+, extra/params [0-9.]+x",
        first,
    )
    # No terminal control codes in a pipe.
    assert "\r" not in out
    assert "\x1b" not in out


@pytest.mark.usefixtures("without_optional")
def test_terminal_shows_a_status_line_and_then_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    capture = _Capture(tty=True)
    monkeypatch.setattr(sys, "stdout", capture)
    argv = ["--quick", "--sizes", "2x2", "--dtypes", "float32", "--only", "Adam.step"]
    assert bench.main(argv) == 0
    out = capture.getvalue()
    assert "\r\x1b[Kmeasuring 2x2 float32 (group 1 of 1, " in out
    # The status line is erased before the table, and no row is printed twice.
    assert "\r\x1b[K\nimplementation " in out
    assert ": us/step " not in out
    assert sum(line.startswith("Adam.step ") for line in out.splitlines()) == 1


def _result(name: str, status: str = "ok", reason: str | None = None) -> measure.Result:
    return measure.Result(name, "2x2", 4, "(2, 2)", "float64", status=status, reason=reason)


def test_progress_on_a_terminal_keeps_notes_above_the_status_line() -> None:
    stream = _Capture(tty=True)
    progress = report.Progress(stream, groups=2)
    progress.start("2x2 float64")
    progress.note("note: something")
    progress.finish([_result("notebook")])
    progress.close()
    out = stream.getvalue()
    status = "measuring 2x2 float64 (group 1 of 2, 0 s)"
    assert out == f"\r\x1b[K{status}\r\x1b[Knote: something\n\r\x1b[K{status}\r\x1b[K"


def test_progress_into_a_pipe_prints_rows_and_reasons() -> None:
    stream = _Capture(tty=False)
    progress = report.Progress(stream, groups=1)
    progress.start("2x2 float64")
    progress.note("note: something")
    progress.finish([_result("torch-fused", "n/a", "torch: no fused kernel")])
    progress.close()
    assert (
        stream.getvalue()
        == "note: something\n\ntorch-fused 2x2 float64: n/a: torch: no fused kernel\n"
    )


def test_plot_without_matplotlib_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "bench.png"
    status = bench.main(["--quick", "--plot", str(path)])
    assert status == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err
    assert 'pip install "adam-functional[plot]"' in err
    assert not path.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("without_optional")
def test_plot_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    # An absolute path below the current folder is printed relative to it.
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plots" / "bench.png"
    path.parent.mkdir()
    argv = ["--quick", "--sizes", "2x2", "1e3", "--only", "notebook,adam_update", "--plot"]
    assert bench.main([*argv, str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.endswith(f"\nwrote {os.path.join('plots', 'bench.png')}\n")


@pytest.mark.usefixtures("without_optional")
def test_only_repeat_and_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--quick", "--sizes", "4e2", "--dtypes", "float32", "--only", "Adam.step"]
    assert bench.main([*argv, "--repeat", "2", "--clock", "cpu", "--json", "results.json"]) == 0
    assert capsys.readouterr().out.endswith("\nwrote results.json\n")
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert data["meta"]["clock"] == "cpu"
    rows = data["results"]
    assert [(r["implementation"], r["size"], r["n"], r["dtype"]) for r in rows] == [
        ("Adam.step", "4e2", 400, "float32")
    ]
    assert len(rows[0]["samples_us"]) == 2
    # Without the notebook in the run there is no baseline for the ratio.
    assert rows[0]["ratio_vs_notebook"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "sgd"], "unknown implementation 'sgd'"),
        (["--sizes", "big"], "expected a size like"),
        (["--sizes", "0"], "expected a size like"),
        (["--repeat", "0"], "expected an integer >= 1, got '0'"),
        (["--repeat", "many"], "invalid int value: 'many'"),
        (["--threads", "-1"], "expected an integer >= 0, got '-1'"),
        (["--clock", "sundial"], "invalid choice: 'sundial'"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m adam_functional.bench")
    assert message in err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_folder_must_exist(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before the run, not after minutes of measuring.
    path = tmp_path / "missing" / "out"
    assert bench.main(["--quick", option, str(path)]) == 2
    assert f"{option}: no folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("bench.json", "bench.json"),
        (os.path.join("out", "bench.json"), os.path.join("out", "bench.json")),
        ("{cwd}/out/bench.json", os.path.join("out", "bench.json")),
        (os.path.join(os.pardir, "bench.json"), os.path.join(os.pardir, "bench.json")),
        ("{other}/bench.json", "{other}/bench.json"),
    ],
)
def test_shown_path_is_relative_below_the_current_folder(
    given: str, shown: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, other = tmp_path / "cwd", tmp_path / "other"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    names = {"cwd": str(cwd), "other": str(other)}
    assert report.shown_path(given.format(**names)) == shown.format(**names)


@pytest.mark.parametrize(
    ("token", "label", "n"),
    [
        ("2x2", "2x2", 4),
        ("1e3", "1e3", 1000),
        ("4e6", "4e6", 4_000_000),
        ("mlp", "mlp25", 104_000),
        ("mlp-tiny", "mlp25-tiny", 1_800),
    ],
)
def test_parse_size(token: str, label: str, n: int) -> None:
    size = sizes.parse_size(token)
    assert size.label == label
    assert size.n == n


def test_mlp_tree_has_50_leaves() -> None:
    size = sizes.parse_size("mlp")
    params, grads = sizes.make_data(size, "float32")
    assert len(params) == 25
    leaves = sizes.leaves(params)
    assert len(leaves) == 50
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    assert [p.shape for p in leaves] == size.leaf_shapes()
    assert [g.shape for g in sizes.leaves(grads)] == size.leaf_shapes()
    assert sizes.nbytes(params) == 4 * size.n


def test_data_is_the_same_in_every_dtype_and_grads_are_read_only() -> None:
    size = sizes.parse_size("1e3")
    p64, g64 = sizes.make_data(size, "float64")
    p32, g32 = sizes.make_data(size, "float32")
    np.testing.assert_array_equal(p32, p64.astype(np.float32))
    np.testing.assert_array_equal(g32, g64.astype(np.float32))
    assert not g64.flags.writeable


@pytest.mark.parametrize(
    ("n", "repeats"),
    [(4, 31), (100_000, 31), (100_001, 15), (2_000_000, 15), (2_000_001, 7), (10**9, 7)],
)
def test_default_repeats_fall_with_size(n: int, repeats: int) -> None:
    assert measure.default_repeats(n) == repeats


def test_notebook_class_matches_its_formula() -> None:
    # The baseline must compute the notebook's step: check its first step by hand.
    p = np.array([1.0, -2.0])
    g = np.array([0.5, 0.25])
    opt = bench.NotebookAdam(lr=0.1)
    opt.step(p, g)
    m = 0.1 * np.array([0.5, 0.25])
    v = 0.001 * np.array([0.5, 0.25]) ** 2
    expected = np.array([1.0, -2.0]) - 0.1 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
    np.testing.assert_array_equal(p, expected)


def test_notebook_module_is_the_notebook_cell_verbatim() -> None:
    if not NOTEBOOK.is_file():
        pytest.skip(MISSING_REASON)
    cell = split_notebook(parse_cells(NOTEBOOK.read_text(encoding="utf-8"))).adam_class
    expected = "".join(line.rstrip() + "\n" for line in cell.source.splitlines())
    source = Path(notebook.__file__).read_text(encoding="utf-8")
    assert source.endswith("\n\n\n" + expected)
    assert bench.NotebookAdam is notebook.Adam


# ---------------------------------------------------------------------------------------------
# docs/benchmarks.md's option table against ``--help``.


def _help_options(text: str) -> dict[str, str]:
    """Maps each option of ``--help`` (as ``--sizes SIZE ...``) to its help text, on one line."""
    options: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        option = re.fullmatch(r"  (-\S.*?)(?:\s{2,}(\S.*))?", line)
        if option is not None:
            # argparse writes repeated arguments as "SIZE [SIZE ...]"; the docs as "SIZE ...".
            invocation = re.sub(r"(\S+) \[\1 \.\.\.\]", r"\1 ...", option[1])
            current = options.setdefault(invocation, [])
            current += [option[2]] if option[2] else []
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return {invocation: " ".join(words) for invocation, words in options.items()}


def _docs_options() -> dict[str, str]:
    """Maps each option in docs/benchmarks.md's option table to its text, without backticks."""
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(--[^`]+)` \| (.+) \|$", text, flags=re.MULTILINE)
    return {option: meaning.replace("`", "") for option, meaning in rows}


@pytest.fixture(scope="module")
def help_options() -> dict[str, str]:
    # Run as users run it, which also checks ``python -m adam_functional.bench``; wide enough
    # that argparse wraps no help text (it would break words at hyphens).
    env = {**os.environ, "COLUMNS": "1000"}
    command = [sys.executable, "-m", "adam_functional.bench", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    options = _help_options(done.stdout)
    assert options.pop("-h, --help") == "show this help message and exit"
    return options


def test_help_lists_every_option(help_options: dict[str, str]) -> None:
    assert list(help_options) == [
        "--sizes SIZE ...",
        "--dtypes {float64,float32} ...",
        "--only NAME ...",
        "--repeat N",
        "--quick",
        "--threads N",
        "--clock {cpu,wall}",
        "--json FILE",
        "--plot FILE.png",
    ]
    assert help_options["--repeat N"].endswith("(default: 31, 15 or 7, falling with size)")


def test_docs_table_has_every_option_of_help(help_options: dict[str, str]) -> None:
    assert list(_docs_options()) == list(help_options)


def test_docs_table_gives_the_defaults_of_help(help_options: dict[str, str]) -> None:
    docs = _docs_options()
    for option, text in help_options.items():
        default = re.search(r"\(default: (.+)\)$", text)
        documented = re.search(r"default: (.+?)\s*(?:;|$)", docs[option])
        if default is None:
            assert documented is None, f"{option}: the docs give a default, --help none"
        else:
            assert documented is not None, f"{option}: no default in the docs"
            assert documented[1] == default[1], option
