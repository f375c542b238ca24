"""The benchmark command runs, writes its JSON and plot, and fails clearly without matplotlib.

These tests check structure only: speed is what the benchmark reports, never what a test asserts.
torch, jax and optax are hidden from every run here, so the tests neither need them nor spend time
importing and compiling them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adam_functional import bench

NUMPY_IMPLEMENTATIONS = ["notebook", "adam_update", "Adam.step"]


@pytest.fixture
def without_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``import torch``, ``import jax`` and ``import optax`` fail, as when not installed."""
    for name in ("torch", "jax", "optax"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str]:
    """One ``--quick --json`` run shared by the tests that read its output."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("torch", "jax", "optax"):
            mp.setitem(sys.modules, name, None)
        capture = _Capture()
        mp.setattr(sys, "stdout", capture)
        status = bench.main(["--quick", "--json", str(path)])
    return status, json.loads(path.read_text(encoding="utf-8")), capture.text


class _Capture:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.parts)


def test_quick_run_succeeds(quick_run: tuple[int, dict[str, Any], str]) -> None:
    status, _, _ = quick_run
    assert status == 0


def test_json_structure(quick_run: tuple[int, dict[str, Any], str]) -> None:
    _, data, _ = quick_run
    assert set(data) == {"meta", "results"}
    meta = data["meta"]
    assert meta["numpy"] == np.__version__
    assert meta["torch"] is None
    assert meta["jax"] is None
    assert isinstance(meta["cpu_count"], int)
    assert meta["cpu_count"] >= 1
    assert meta["implementations"] == NUMPY_IMPLEMENTATIONS
    assert meta["sizes"] == ["2x2", "1e3", "mlp25-tiny"]
    assert meta["dtypes"] == ["float64", "float32"]
    assert any("torch is not installed" in note for note in meta["notes"])
    assert meta["not_installed"] == ["torch", "jax", "optax"]

    rows = data["results"]
    keys = {(r["implementation"], r["size"], r["dtype"]) for r in rows}
    assert keys == {
        (name, size, dtype)
        for name in NUMPY_IMPLEMENTATIONS
        for size in meta["sizes"]
        for dtype in meta["dtypes"]
    }
    assert len(rows) == len(keys)


def test_every_row_has_positive_times(quick_run: tuple[int, dict[str, Any], str]) -> None:
    _, data, _ = quick_run
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["median_us"] > 0
        assert row["min_us"] > 0
        assert row["spread"] >= 0
        assert row["first_call_us"] > 0
        assert len(row["samples_us"]) == 3
        assert all(t > 0 for t in row["samples_us"])
        assert row["steps_per_sample"] >= 1
        assert row["ratio_vs_notebook"] > 0
        # NumPy implementations are measured with tracemalloc.
        assert row["memory_note"] == "tracemalloc"
        assert row["peak_extra_bytes"] >= 0


def test_ratio_is_notebook_time_over_implementation_time(
    quick_run: tuple[int, dict[str, Any], str],
) -> None:
    _, data, _ = quick_run
    rows = data["results"]
    notebook = {
        (r["size"], r["dtype"]): r["median_us"] for r in rows if r["implementation"] == "notebook"
    }
    for row in rows:
        expected = notebook[row["size"], row["dtype"]] / row["median_us"]
        assert row["ratio_vs_notebook"] == pytest.approx(expected)


def test_table_prints(quick_run: tuple[int, dict[str, Any], str]) -> None:
    _, _, out = quick_run
    assert "backend:" in out
    assert "cores" in out
    assert "note: torch is not installed" in out
    assert "note: jax and optax not installed" in out
    header = next(line for line in out.splitlines() if line.startswith("implementation"))
    assert header.split() == [
        "implementation",
        "size",
        "dtype",
        "us/step",
        "spread",
        "ratio",
        "first",
        "us",
        "extra",
        "MiB",
        "extra/params",
    ]
    for name in NUMPY_IMPLEMENTATIONS:
        assert any(line.startswith(f"{name} ") for line in out.splitlines())


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
    assert "matplotlib" in err
    assert 'pip install "adam-functional[plot]"' in err
    assert not path.exists()


@pytest.mark.usefixtures("without_optional")
def test_plot_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    argv = ["--quick", "--sizes", "2x2", "1e3", "--only", "notebook,adam_update", "--plot"]
    assert bench.main([*argv, str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in capsys.readouterr().out


@pytest.mark.usefixtures("without_optional")
def test_only_repeat_and_clock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    argv = ["--quick", "--sizes", "4e2", "--dtypes", "float32", "--only", "Adam.step"]
    assert bench.main([*argv, "--repeat", "2", "--clock", "cpu", "--json", str(path)]) == 0
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["meta"]["clock"] == "cpu"
    rows = data["results"]
    assert [(r["implementation"], r["size"], r["n"], r["dtype"]) for r in rows] == [
        ("Adam.step", "4e2", 400, "float32")
    ]
    assert len(rows[0]["samples_us"]) == 2
    # Without the notebook in the run there is no baseline for the ratio.
    assert rows[0]["ratio_vs_notebook"] is None
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "sgd"], "unknown implementation 'sgd'"),
        (["--sizes", "big"], "expected a size like"),
        (["--sizes", "0"], "expected a size like"),
        (["--repeat", "0"], "expected an integer >= 1"),
        (["--clock", "sundial"], "invalid choice: 'sundial'"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("token", "label", "n"),
    [("2x2", "2x2", 4), ("1e3", "1e3", 1000), ("4e6", "4e6", 4_000_000), ("mlp", "mlp25", 385_290)],
)
def test_parse_size(token: str, label: str, n: int) -> None:
    size = bench.parse_size(token)
    assert size.label == label
    assert size.n == n


def test_mlp_tree_has_50_leaves() -> None:
    params, grads = bench._make_data(bench.parse_size("mlp"), "float32")
    assert len(params) == 25
    leaves = bench._leaves(params)
    assert len(leaves) == 50
    assert all(leaf.dtype == np.float32 for leaf in leaves)
    assert [g.shape for g in bench._leaves(grads)] == [p.shape for p in leaves]


def test_vendored_notebook_class_matches_its_formula() -> None:
    # The baseline must compute the notebook's step: check its first step by hand.
    p = np.array([1.0, -2.0])
    g = np.array([0.5, 0.25])
    opt = bench.NotebookAdam(lr=0.1)
    opt.step(p, g)
    m = 0.1 * np.array([0.5, 0.25])
    v = 0.001 * np.array([0.5, 0.25]) ** 2
    expected = np.array([1.0, -2.0]) - 0.1 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
    np.testing.assert_array_equal(p, expected)


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_folder_must_exist(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before the run, not after minutes of measuring.
    path = tmp_path / "missing" / "out"
    assert bench.main(["--quick", option, str(path)]) == 2
    assert f"{option}: no folder" in capsys.readouterr().err
