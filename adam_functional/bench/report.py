"""What the benchmark prints and writes: the header, the progress, the table, the JSON and the plot.

How to read the table: ``us/step`` is the median time of one step in microseconds, ``spread`` the
interquartile range of the samples over their median (above some 20%, the machine was not quiet
enough to trust the digits). ``ratio`` is the notebook's time divided by the implementation's time
at the same size and dtype: above 1 the implementation is faster than the notebook, 2.0 means
twice as fast; it needs the notebook in the run. ``first us`` is the first call; for the jitted
rows that is mostly compilation. ``extra MiB`` is the peak memory one step allocates beyond its
unavoidable outputs, and ``extra/params`` the same in units of the parameters' size; "n/a" where
tracemalloc cannot see the allocator (torch, XLA).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, TextIO

import attrs
import numpy as np

import adam_functional
from adam_functional.bench.implementations import IMPLEMENTATIONS, Libraries
from adam_functional.bench.measure import Result

__all__ = [
    "METHOD",
    "Progress",
    "backend_name",
    "environment",
    "format_table",
    "header",
    "plot",
    "shown_path",
    "write_json",
]

#: How the numbers are made, for the JSON's ``meta``.
METHOD = (
    "median over interleaved repetitions of microseconds per step; ratio_vs_notebook = "
    "notebook median / implementation median; peak_extra = tracemalloc peak during one step "
    "above the memory before it, less the arrays the step returns"
)

_COLUMNS = (
    "implementation",
    "size",
    "dtype",
    "us/step",
    "spread",
    "ratio",
    "first us",
    "extra MiB",
    "extra/params",
)
_LABEL_COLUMNS = 3  # left-aligned; the numbers after them are right-aligned


def _version(module: ModuleType | None) -> str | None:
    return None if module is None else str(getattr(module, "__version__", "unknown"))


def backend_name() -> str | None:
    """``adam_functional.backend()``, or why it failed (None where the package has no backends)."""
    backend = getattr(adam_functional, "backend", None)
    if backend is None:
        return None
    try:
        value = backend() if callable(backend) else backend
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    return str(value)


def environment(
    libs: Libraries, *, backend: str | None, threads: str, clock: str
) -> dict[str, Any]:
    """The versions, the machine and the settings of a run: the start of the JSON's ``meta``."""
    return {
        "adam_functional": _version(adam_functional),
        "backend": backend,
        "numpy": np.__version__,
        "torch": _version(libs.torch),
        "jax": _version(libs.jax),
        "optax": _version(libs.optax),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "clock": clock,
    }


def header(meta: dict[str, Any], missing: Sequence[str]) -> str:
    """The lines above the table: versions, machine, threads and clock."""

    def v(key: str) -> str:
        if meta[key] is not None:
            return str(meta[key])
        return "not installed" if key in missing else "not run"

    return "\n".join(
        [
            f"adam_functional {meta['adam_functional']}, backend: {meta['backend'] or 'n/a'}",
            f"numpy {meta['numpy']}, torch {v('torch')}, jax {v('jax')}, optax {v('optax')}, "
            f"python {meta['python']}",
            f"machine: {meta['platform']}, {meta['cpu_count']} cores; threads: {meta['threads']}",
            f"clock: {meta['clock']}",
        ]
    )


def _fmt_time(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us:.3g}" if us < 100 else f"{us:,.0f}"


def _cells(r: Result) -> tuple[str, ...]:
    """A row's cells under ``_COLUMNS``; an unmeasured row has its status as its time."""
    if r.status != "ok":
        return (r.implementation, r.size, r.dtype, r.status, "", "", "", "", "")
    if r.peak_extra_mib is None or r.peak_extra_per_params is None:
        memory = ("n/a", "n/a")
    else:
        memory = (f"{r.peak_extra_mib:.3g}", f"{r.peak_extra_per_params:.2f}x")
    return (
        r.implementation,
        r.size,
        r.dtype,
        _fmt_time(r.median_us),
        "n/a" if r.spread is None else f"{100 * r.spread:.0f}%",
        "n/a" if r.ratio_vs_notebook is None else f"{r.ratio_vs_notebook:.2f}",
        _fmt_time(r.first_call_us),
        *memory,
    )


def _reason(r: Result) -> str:
    return f"{r.implementation} {r.size} {r.dtype}: {r.status}: {r.reason}"


def format_table(results: Sequence[Result]) -> str:
    """Returns the results as a text table, with the reasons for n/a rows below it."""
    rows = [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(w) for cell, w in zip(row, widths[:_LABEL_COLUMNS])]
        cells += [cell.rjust(w) for cell, w in zip(row[_LABEL_COLUMNS:], widths[_LABEL_COLUMNS:])]
        return "  ".join(cells).rstrip()

    out = [line(_COLUMNS), line(["-" * w for w in widths])]
    previous: tuple[str, str] | None = None
    for r, row in zip(results, rows, strict=True):
        if previous is not None and (r.size, r.dtype) != previous:
            out.append("")
        previous = (r.size, r.dtype)
        out.append(line(row))
    out += _against_others(results)
    reasons = [f"  {_reason(r)}" for r in results if r.status != "ok"]
    if reasons:
        out += ["", "not measured:", *reasons]
    return "\n".join(out)


#: Pairs of (ours, theirs) whose time ratio `format_table` states, when both were measured.
AGAINST = (
    ("Adam.step", "torch-fused"),
    ("adam_update", "torch-fused"),
    ("adam_update", "optax-jit"),
    ("Adam.step", "optax-jit-donate"),
    ("Adam.step-torch", "torch-fused"),
    ("adam_update-jax", "optax-jit"),
)


def _against_others(results: Sequence[Result]) -> list[str]:
    """Lines giving our time over torch's and optax's, per size and dtype (below 1: faster)."""
    times = {
        (r.implementation, r.size, r.dtype): r.median_us
        for r in results
        if r.status == "ok" and r.median_us
    }
    lines = []
    for size, dtype in dict.fromkeys((r.size, r.dtype) for r in results):
        parts = []
        for ours, theirs in AGAINST:
            a, b = times.get((ours, size, dtype)), times.get((theirs, size, dtype))
            if a is not None and b is not None:
                parts.append(f"{ours} / {theirs} {a / b:.2f}")
        if parts:
            lines.append(f"  {size} {dtype}: " + ", ".join(parts))
    if not lines:
        return []
    return ["", "time against torch and optax, same threads (below 1: faster):", *lines]


def _progress_line(r: Result) -> str:
    """One row as a line of its own: its labels, then each measured column as ``name value``."""
    if r.status != "ok":
        return _reason(r)
    cells = _cells(r)
    pairs = zip(_COLUMNS[_LABEL_COLUMNS:], cells[_LABEL_COLUMNS:], strict=True)
    return " ".join(cells[:_LABEL_COLUMNS]) + ": " + ", ".join(f"{k} {v}" for k, v in pairs)


class Progress:
    """Shows a run while it goes.

    On a terminal, one status line, rewritten in place, says which group is being measured; it is
    erased when the run ends, so that what stays on the screen is the header and the table. Into a
    file or a pipe, each group's rows are written as they complete, one line a row, a blank line
    before each group.
    """

    def __init__(self, stream: TextIO, groups: int) -> None:
        self._stream = stream
        isatty = getattr(stream, "isatty", None)
        self._live = bool(isatty is not None and isatty())
        self._groups = groups
        self._done = 0
        self._status = ""
        self._started = time.perf_counter()

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    def _show(self, status: str) -> None:
        if self._live:
            self._write(f"\r\x1b[K{status}")
        self._status = status

    def start(self, label: str) -> None:
        """A group begins; ``label`` names it."""
        seconds = time.perf_counter() - self._started
        self._show(f"measuring {label} (group {self._done + 1} of {self._groups}, {seconds:.0f} s)")

    def note(self, text: str) -> None:
        """A line to keep, printed at once (above the status line on a terminal)."""
        status = self._status
        self._show("")
        self._write(text + "\n")
        self._show(status)

    def finish(self, results: Sequence[Result]) -> None:
        """A group has ended with these rows."""
        self._done += 1
        if not self._live:
            self._write("".join(f"\n{_progress_line(r)}" for r in results) + "\n")

    def close(self) -> None:
        """The run has ended: erases the status line."""
        self._show("")


def shown_path(path: str) -> str:
    """``path`` relative to the current folder when it lies below it, else as given."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if relative.startswith(os.pardir) else relative


def write_json(path: str, meta: dict[str, Any], results: Sequence[Result]) -> None:
    """Writes ``{"meta": meta, "results": [one object per row]}``, indented, to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": [attrs.asdict(r) for r in results]}, f, indent=2)
        f.write("\n")


def plot(path: str, results: Sequence[Result], title: str) -> None:
    """Plots time per step against size, log-log, one line per implementation and dtype."""
    figure_module = importlib.import_module("matplotlib.figure")
    agg = importlib.import_module("matplotlib.backends.backend_agg")
    # The object-oriented API, without pyplot, leaves matplotlib's global state alone.
    fig = figure_module.Figure(figsize=(9, 6), layout="constrained")
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        if r.status == "ok" and r.median_us is not None and not r.size.startswith("mlp"):
            lines.setdefault((r.implementation, r.dtype), []).append((r.n, r.median_us))
    colors = {name: f"C{i}" for i, name in enumerate(IMPLEMENTATIONS)}
    styles = {"float64": "-", "float32": "--"}
    for (name, dtype), points in lines.items():
        points.sort()
        ax.plot(
            [n for n, _ in points],
            [us for _, us in points],
            linestyle=styles.get(dtype, ":"),
            marker="o",
            color=colors.get(name, "k"),
            label=f"{name} {dtype}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (elements)")
    ax.set_ylabel("median time per step (us)")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize="small", ncol=2)
    fig.savefig(path, dpi=120)
