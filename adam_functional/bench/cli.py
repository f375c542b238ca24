"""The command line: ``python -m adam_functional.bench [options]``; see ``--help``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence

from adam_functional.bench.implementations import (
    IMPLEMENTATIONS,
    jax_x64,
    load_libraries,
)
from adam_functional.bench.measure import (
    BATCH_SECONDS,
    CLOCKS,
    DEFAULT_REPEATS,
    QUICK_BATCH_SECONDS,
    QUICK_REPEATS,
    Result,
    pinned_threads,
    run_group,
)
from adam_functional.bench.report import (
    METHOD,
    Progress,
    backend_name,
    environment,
    format_table,
    header,
    plot,
    shown_path,
    write_json,
)
from adam_functional.bench.sizes import (
    DEFAULT_DTYPES,
    DEFAULT_SIZES,
    QUICK_SIZES,
    Size,
    parse_size,
)

__all__ = ["main"]

_PROG = "python -m adam_functional.bench"
_PLOT_INSTALL = 'pip install "adam-functional[plot]"'


def _parse_only(values: Sequence[str]) -> list[str]:
    by_lower = {name.lower(): name for name in IMPLEMENTATIONS}
    chosen: list[str] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            name = by_lower.get(part.strip().lower())
            if name is None:
                raise argparse.ArgumentTypeError(
                    f"unknown implementation {part.strip()!r}; expected some of "
                    + ", ".join(IMPLEMENTATIONS)
                )
            if name not in chosen:
                chosen.append(name)
    return [name for name in IMPLEMENTATIONS if name in chosen]


def _int_from(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value

    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value: 'x'"
    return parse


def _parser() -> argparse.ArgumentParser:
    repeats = [str(repeats) for _, repeats in DEFAULT_REPEATS]
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Time and memory of one Adam step: adam_functional against the seed "
        "notebook's class, torch.optim.Adam and optax.adam (when installed). ratio = notebook "
        "time / implementation time (>1: faster than the notebook).",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        metavar="SIZE",
        help="sizes: NxM shapes, element counts (1e3, 4e6), 'mlp' (50-leaf tree) or 'mlp-tiny' "
        f"(default: {' '.join(DEFAULT_SIZES)})",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DEFAULT_DTYPES,
        default=list(DEFAULT_DTYPES),
        help=f"dtypes (default: {' '.join(DEFAULT_DTYPES)})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these implementations (names or comma lists): "
        f"{', '.join(IMPLEMENTATIONS)} (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=_int_from(1),
        metavar="N",
        help="repetitions per implementation "
        f"(default: {', '.join(repeats[:-1])} or {repeats[-1]}, falling with size)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: sizes {' '.join(QUICK_SIZES)}, {QUICK_REPEATS} repetitions of short "
        "batches",
    )
    parser.add_argument(
        "--threads",
        type=_int_from(0),
        default=1,
        metavar="N",
        help="pin the process to N cores and give torch and numba N threads; 0 leaves the "
        "process as it is (default: %(default)s)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of the process, steadier on a busy machine, and "
        "with --threads 1 the time the step would take on an idle core (default: %(default)s)",
    )
    parser.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help=f"plot time per step against size (log-log); needs matplotlib: {_PLOT_INSTALL}",
    )
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (0, 1 if an implementation failed, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        names = _parse_only(args.only) if args.only else list(IMPLEMENTATIONS)
    except argparse.ArgumentTypeError as exc:
        parser.print_usage(sys.stderr)
        return _usage_error(parser, str(exc))
    except SystemExit as exc:  # argparse's own errors and --help
        return exc.code if isinstance(exc.code, int) else 2

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(path or "") or "."
        if path is not None and not os.path.isdir(folder):
            return _usage_error(parser, f"{option}: no folder {folder!r}")

    if args.plot is not None:
        try:
            importlib.import_module("matplotlib.figure")
            importlib.import_module("matplotlib.backends.backend_agg")
        except ImportError:
            return _usage_error(
                parser, f"--plot needs matplotlib, which is not installed; {_PLOT_INSTALL}"
            )

    sizes: list[Size] = args.sizes or [
        parse_size(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    ]
    batch_seconds = QUICK_BATCH_SECONDS if args.quick else BATCH_SECONDS
    repeat = args.repeat if args.repeat is not None else (QUICK_REPEATS if args.quick else None)

    libs = load_libraries(names)
    for note in libs.notes:
        print(f"note: {note}")
    names = libs.runnable(names)

    started = time.perf_counter()
    results: list[Result] = []
    backend = backend_name()
    if backend == "numba":
        # numba is imported at the first large step; import it now, so that its thread pool is
        # sized with torch's.
        importlib.import_module("adam_functional.kernels.numba").load()
    progress = Progress(sys.stdout, groups=len(sizes) * len(args.dtypes))
    with pinned_threads(args.threads, libs) as threads, jax_x64(libs):
        meta = environment(libs, backend=backend, threads=threads, clock=args.clock)
        print(header(meta, libs.missing))
        try:
            for size in sizes:
                for dtype in args.dtypes:
                    progress.start(f"{size.label} {dtype}")
                    rows = run_group(
                        size,
                        dtype,
                        names,
                        libs,
                        repeat=repeat,
                        batch_seconds=batch_seconds,
                        clock=CLOCKS[args.clock],
                        log=progress.note,
                    )
                    progress.finish(rows)
                    results += rows
        finally:
            progress.close()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["sizes"] = [s.label for s in sizes]
    meta["dtypes"] = list(args.dtypes)
    meta["implementations"] = names
    meta["notes"] = libs.notes
    meta["not_installed"] = libs.missing
    meta["method"] = METHOD

    print()
    print(format_table(results))
    print(f"\n{len(results)} rows in {meta['seconds']} s")
    if args.json is not None:
        write_json(args.json, meta, results)
        print(f"wrote {shown_path(args.json)}")
    if args.plot is not None:
        title = f"Adam step, {meta['machine']}, {meta['cpu_count']} cores, threads {args.threads}"
        plot(args.plot, results, title)
        print(f"wrote {shown_path(args.plot)}")
    return 1 if any(r.status == "error" for r in results) else 0
