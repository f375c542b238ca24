"""The time and memory of one step of each implementation, for one size and dtype.

Time: each size and dtype is one group. Every implementation in the group makes its first call
(timed on its own: state allocation, tracing and compilation), then the group runs repetitions
round-robin: one batch of steps of each implementation in turn, the starting implementation
rotating, so that a drift of the machine (clock, heat, other load) falls on all of them alike. A
batch is long enough (``BATCH_SECONDS``) for the clock to resolve it; its time divided by its
steps is one sample, and a row's time is the median of its samples (``DEFAULT_REPEATS`` of them).
The garbage collector is off while timing. Times include the memory allocator, as in a training
loop: a step that allocates fresh arrays (the notebook class, the pure update) pays for page
faults whenever the C library hands large blocks back to the system (glibc always does above
32 MiB, and at times below).

The clock (``CLOCKS``) is elapsed time, or the CPU time of the process, which on a busy machine
leaves out the time other processes held the core; with one thread it is close to the elapsed time
on an idle core (with more threads it adds them up). ``pinned_threads`` pins the process to N
cores and gives torch (intra-op) and numba N threads: NumPy's elementwise operations use one core,
so one thread compares like with like.

Memory: the peak that one step allocates beyond its unavoidable outputs, measured with
``tracemalloc`` (NumPy reports its buffers to it): the high-water mark during a step above the
memory in use before it, less the arrays the step must return (the new parameters and state of the
pure update; nothing for in-place steps). The notebook class's new moment arrays are not outputs
it must allocate, so they count as extra. tracemalloc cannot see the allocators of torch and XLA.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence

import attrs

from adam_functional.bench.implementations import Libraries, Runner, Unsupported, make_runner
from adam_functional.bench.sizes import Size, make_data, nbytes

__all__ = [
    "BATCH_SECONDS",
    "CLOCKS",
    "DEFAULT_REPEATS",
    "QUICK_BATCH_SECONDS",
    "QUICK_REPEATS",
    "Result",
    "default_repeats",
    "pinned_threads",
    "run_group",
]

#: The clocks ``--clock`` offers, in nanoseconds: elapsed time, or the CPU time of the process
#: (all its threads, user and system), which leaves out the time other processes held the core.
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}

#: Samples per row by size: (up to this many parameters, samples), the last for any size. Larger
#: arrays take fewer, longer samples; the spread is small next to the step time.
DEFAULT_REPEATS: tuple[tuple[int, int], ...] = ((100_000, 31), (2_000_000, 15), (sys.maxsize, 7))
#: Seconds of one batch of steps, a sample: long enough for the clock to resolve it.
BATCH_SECONDS = 0.025
#: ``--quick``: samples per row and seconds per batch.
QUICK_REPEATS = 3
QUICK_BATCH_SECONDS = 0.001

_MIB = float(1 << 20)


@attrs.define
class Result:
    """One row of the results."""

    implementation: str
    size: str
    n: int
    shape: str
    dtype: str
    status: str = "ok"  # "ok", "n/a" (cannot run this case) or "error" (failed)
    reason: str | None = None
    median_us: float | None = None
    min_us: float | None = None
    spread: float | None = None  # interquartile range of the samples / median
    samples_us: list[float] = attrs.Factory(list)
    steps_per_sample: int | None = None
    first_call_us: float | None = None
    ratio_vs_notebook: float | None = None
    peak_extra_bytes: int | None = None
    peak_extra_mib: float | None = None
    peak_extra_per_params: float | None = None
    memory_note: str | None = None


def default_repeats(n: int) -> int:
    """Samples per row for a size of ``n`` parameters (see ``DEFAULT_REPEATS``)."""
    return next(repeats for largest, repeats in DEFAULT_REPEATS if n <= largest)


@contextlib.contextmanager
def _gc_disabled() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _time_steps(step: Callable[[], None], steps: int, clock: Callable[[], int]) -> float:
    """Returns the mean time of ``steps`` consecutive steps, in microseconds."""
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps / 1e3


def _peak_extra_bytes(runner: Runner) -> int:
    """Peak bytes one step allocates beyond the arrays it returns, measured with tracemalloc."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        # One step under tracing first, so that the state it leaves is traced and its release
        # during the measured step is counted (the notebook class and the pure update replace
        # their arrays every step).
        runner.step()
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        runner.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    return max(0, peak - before - runner.output_nbytes())


def run_group(
    size: Size,
    dtype: str,
    names: Sequence[str],
    libs: Libraries,
    *,
    repeat: int | None,
    batch_seconds: float,
    clock: Callable[[], int],
    log: Callable[[str], None],
) -> list[Result]:
    """Measures the implementations ``names`` on one size and dtype; one row each, in order.

    ``repeat`` is the number of samples (None: ``default_repeats``); warnings of the first calls
    go to ``log``. An implementation that cannot run or fails is a row with its reason.
    """
    params, grads = make_data(size, dtype)
    param_bytes = nbytes(params)
    results: dict[str, Result] = {}
    runners: dict[str, Runner] = {}
    for name in names:
        result = Result(name, size.label, size.n, size.describe(), dtype)
        results[name] = result
        try:
            runner = make_runner(name, libs, params, grads)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = clock()
                runner.step()
                result.first_call_us = (clock() - start) / 1e3
            for w in caught:
                log(f"note: {name} {size.label} {dtype}: {w.category.__name__}: {w.message}")
        except Unsupported as exc:
            result.status, result.reason = "n/a", str(exc)
            continue
        except Exception as exc:  # a broken implementation is reported, not fatal
            if name == "torch-fused":
                result.status, result.reason = "n/a", f"{type(exc).__name__}: {exc}"
            else:
                result.status, result.reason = "error", f"{type(exc).__name__}: {exc}"
            continue
        runners[name] = runner

    order = list(runners)
    steps: dict[str, int] = {}
    with _gc_disabled():
        for name in order:
            estimate = _time_steps(runners[name].step, 1, clock)
            steps[name] = max(1, min(100_000, math.ceil(batch_seconds * 1e6 / max(estimate, 1e-3))))
            results[name].steps_per_sample = steps[name]
        reps = repeat if repeat is not None else default_repeats(size.n)
        for rep in range(reps):
            shift = rep % max(1, len(order))
            for name in order[shift:] + order[:shift]:
                sample = _time_steps(runners[name].step, steps[name], clock)
                results[name].samples_us.append(sample)

    for name, runner in runners.items():
        result = results[name]
        result.median_us = statistics.median(result.samples_us)
        result.min_us = min(result.samples_us)
        if len(result.samples_us) >= 2:
            q1, _, q3 = statistics.quantiles(result.samples_us, n=4)
            result.spread = (q3 - q1) / result.median_us
        if runner.memory_unseen is not None:
            result.memory_note = runner.memory_unseen
            continue
        extra = _peak_extra_bytes(runner)
        result.peak_extra_bytes = extra
        result.peak_extra_mib = extra / _MIB
        result.peak_extra_per_params = extra / param_bytes
        result.memory_note = "tracemalloc"

    baseline = results.get("notebook")
    for result in results.values():
        if baseline is not None and baseline.median_us and result.median_us:
            result.ratio_vs_notebook = baseline.median_us / result.median_us
    del runners
    gc.collect()
    return [results[name] for name in names]


@contextlib.contextmanager
def pinned_threads(threads: int, libs: Libraries) -> Iterator[str]:
    """Pins the process to ``threads`` cores and sizes the thread pools alike; restores all.

    The pools are torch's intra-op threads and numba's (imported by the package's numba backend
    when that is active); NumPy's elementwise operations run on one thread anyway. ``threads`` 0
    leaves all as it is. Yields a description of the setting, for the report's header.
    """
    pools: list[tuple[str, Callable[[], int], Callable[[int], None]]] = []
    if libs.torch is not None:
        pools.append(("torch", libs.torch.get_num_threads, libs.torch.set_num_threads))
    numba = sys.modules.get("numba")
    if numba is not None:
        pools.append(("numba", numba.get_num_threads, numba.set_num_threads))
    restore = [(set_threads, get_threads()) for _, get_threads, set_threads in pools]
    affinity: set[int] | None = None
    pinned = "not pinned"
    try:
        if threads > 0:
            if hasattr(os, "sched_setaffinity"):
                cores = sorted(os.sched_getaffinity(0))[:threads]
                try:
                    affinity = os.sched_getaffinity(0)
                    os.sched_setaffinity(0, cores)
                    pinned = f"pinned to cores {cores}"
                except OSError as exc:
                    affinity, pinned = None, f"not pinned: {exc}"
            for _, _, set_threads in pools:
                with contextlib.suppress(ValueError):  # numba: more than it was started with
                    set_threads(threads)
        sized = "".join(f"; {name} threads: {get_threads()}" for name, get_threads, _ in pools)
        yield f"{threads or 'all'} ({pinned}{sized}; NumPy elementwise: 1)"
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        for set_threads, old in restore:
            set_threads(old)
