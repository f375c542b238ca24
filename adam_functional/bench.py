"""Benchmark of one Adam step: ``python -m adam_functional.bench``.

What is measured
----------------
For every implementation, size and dtype: the time of one optimizer step with fixed gradients
(the model is not part of the measurement), its first call, and the peak memory it allocates on
top of what the step has to return. The implementations are

- ``notebook``: the seed notebook's ``Adam`` class, vendored below unchanged (but for trailing
  whitespace); the baseline.
- ``adam_update``: the pure update, with the new parameters and state threaded through.
- ``Adam.step``: the in-place wrapper.
- ``torch-foreach`` / ``torch-fused``: ``torch.optim.Adam`` on CPU with ``foreach=True`` /
  ``fused=True``, stepped under ``torch.no_grad()`` (when torch is installed).
- ``optax-jit`` / ``optax-jit-donate``: ``optax.adam`` plus ``optax.apply_updates`` under
  ``jax.jit``, without and with donation of the parameters and state (``donate_argnums``), float64
  through ``jax_enable_x64`` (when jax and optax are installed). Every step is blocked on with
  ``jax.block_until_ready``, so a step's time is its latency, as for the NumPy implementations.

All use the default configuration (``lr=1e-3``, ``beta1=0.9``, ``beta2=0.999``, ``eps=1e-8``, no
weight decay); ``adam_update`` and ``Adam.step`` include their check for non-finite gradients,
torch and optax have none. Sizes are single arrays (``2x2``, ``1e3`` ... ``1e7`` elements) and
``mlp``, a tree of 50 arrays shaped like a 25-layer MLP (a dict of layers with ``'w'`` and
``'b'``, 385,290 parameters): ``adam_update``, ``Adam.step`` and optax take the tree, torch its
50 tensors as one parameter list, and the notebook class steps one leaf at a time. Parameters and
gradients come from fixed seeds, the same values in every dtype.

How it is timed
---------------
Each size and dtype is one group. Every implementation in the group makes its first call (timed
on its own: state allocation, tracing and compilation), then the group runs repetitions
round-robin: one batch of steps of each implementation in turn, the starting implementation
rotating, so that a drift of the machine (clock, heat, other load) falls on all of them alike. A
batch is long enough (about 25 ms) for the clock to resolve it; its time divided by its steps is
one sample, and the table shows the median of the samples (31, 15 or 7 of them as size grows).
The garbage collector is off while timing. ``--threads N`` (default 1) pins the process to N cores
and gives torch (intra-op) and numba N threads: NumPy's elementwise operations use one core, so the
default compares like with like; ``--threads 0`` leaves the process as it is. The header names the
package's compute backend (``adam_functional.backend()``); run once per backend to compare them
(``ADAM_FUNCTIONAL_BACKEND=numpy python -m adam_functional.bench``). A compiled backend compiles
on its first call for each dtype and kind of array, which the ``first us`` column shows.
``--clock cpu`` measures the CPU time of the process instead of elapsed time: on a busy machine it
leaves out the time other processes held the core, and with ``--threads 1`` it is close to the
elapsed time on an idle core (with more threads it adds them up, so keep ``wall`` there).

Times include the memory allocator, as in a training loop: a step that allocates fresh arrays
(the notebook class, the pure update) pays for page faults whenever the C library hands large
blocks back to the system (glibc always does above 32 MiB, as for the arrays of the 1e7 rows, and
at times below). On a busy machine samples vary; ``spread`` (interquartile range over median)
says by how much, and a spread above some 20% means the machine was not quiet enough to trust the
digits.

How to read it
--------------
``us/step`` is the median time of one step in microseconds. ``ratio`` is the notebook's time
divided by the implementation's time at the same size and dtype: above 1 the implementation is
faster than the notebook, 2.0 means twice as fast; it needs the notebook in the run.
``first us`` is the first call; for the jitted rows that is mostly compilation.

``extra MiB`` is the peak memory one step allocates beyond its unavoidable outputs: measured with
`tracemalloc` (NumPy reports its buffers to it), it is the high-water mark during a step above
the memory in use before it, less the arrays the step must return (the new parameters and state of
the pure update; nothing for in-place steps). The notebook class's new moment arrays are not
outputs it must allocate, so they count as extra. ``extra/params`` is the same in units of the
parameters' size. tracemalloc cannot see the allocators of torch and XLA, so their memory is "n/a".

Options: ``--sizes``, ``--dtypes``, ``--only``, ``--repeat``, ``--quick``, ``--threads``,
``--clock``, ``--json`` and ``--plot`` (needs matplotlib:
``pip install "adam-functional[plot]"``); see ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import attrs
import numpy as np

import adam_functional
from adam_functional import Adam, AdamConfig, adam_init, adam_update

__all__ = ["IMPLEMENTATIONS", "NotebookAdam", "main"]

# The seed notebook's class, kept as source text so that the baseline is the notebook's code token
# for token: no reformatting, no annotations, and its docstring example (which needs the
# notebook's variables) is not collected as a doctest. Only trailing whitespace was removed.
_NOTEBOOK_SOURCE = '''
class Adam:
    """
    Adam (Adaptive Moment Estimation) optimizer implemented from scratch using NumPy.

    Adam combines the advantages of two other extensions of stochastic gradient descent:
    - Adaptive Gradient Algorithm (AdaGrad) that maintains per-parameter learning rates
    - Root Mean Square Propagation (RMSProp) that maintains a moving average of squared gradients

    Parameters:
    -----------
    lr : float, optional
        Learning rate (step size) for weight updates (default: 0.001)
    beta1 : float, optional
        Exponential decay rate for the first moment estimates (default: 0.9)
    beta2 : float, optional
        Exponential decay rate for the second moment estimates (default: 0.999)
    eps : float, optional
        Small constant for numerical stability (default: 1e-8)
    weight_decay : float, optional
        L2 regularization coefficient (default: 0.0)

    Examples:
    --------
    >>> optimizer = Adam(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01)
    >>> optimizer.step(weights, gradients)
    """

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay

        # Dictionary to store first moment (momentum) for each parameter set
        self.m = {}
        # Dictionary to store second moment (uncentered variance) for each parameter set
        self.v = {}
        # Dictionary to store step count for bias correction
        self.t = {}

    def step(self, params, grads):
        """
        Perform a single Adam optimization step.

        Parameters:
        -----------
        params : numpy.ndarray
            Model parameters (weights) to be updated (modified in-place)
        grads : numpy.ndarray
            Gradients with respect to the parameters

        Algorithm:
        ----------
        1. Apply weight decay if enabled: g_t = g_t + weight_decay * w_t
        2. Update biased first moment estimate: m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
        3. Update biased second raw moment estimate: v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
        4. Compute bias-corrected first moment: m_hat_t = m_t / (1 - beta1^t)
        5. Compute bias-corrected second moment: v_hat_t = v_t / (1 - beta2^t)
        6. Update parameters: w_t = w_{t-1} - lr * m_hat_t / (sqrt(v_hat_t) + eps)
        """
        # Get unique identifier for this parameter set
        param_id = id(params)

        # Initialize moment estimates and step count if not exists
        if param_id not in self.m:
            self.m[param_id] = np.zeros_like(params)
            self.v[param_id] = np.zeros_like(params)
            self.t[param_id] = 0

        # Increment step count
        self.t[param_id] += 1
        t = self.t[param_id]

        # Apply L2 regularization (weight decay) to gradients
        if self.weight_decay > 0:
            grads = grads + self.weight_decay * params

        # Update biased first moment estimate
        # m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
        self.m[param_id] = self.beta1 * self.m[param_id] + (1 - self.beta1) * grads

        # Update biased second raw moment estimate
        # v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
        self.v[param_id] = self.beta2 * self.v[param_id] + (1 - self.beta2) * (grads ** 2)

        # Compute bias-corrected first moment estimate
        # m_hat_t = m_t / (1 - beta1^t)
        m_hat = self.m[param_id] / (1 - self.beta1 ** t)

        # Compute bias-corrected second raw moment estimate
        # v_hat_t = v_t / (1 - beta2^t)
        v_hat = self.v[param_id] / (1 - self.beta2 ** t)

        # Update parameters
        # w_t = w_{t-1} - lr * m_hat_t / (sqrt(v_hat_t) + eps)
        params[:] = params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
'''


def _load_notebook_adam() -> type[Any]:
    namespace: dict[str, Any] = {"np": np}
    exec(compile(_NOTEBOOK_SOURCE, "<seed notebook: class Adam>", "exec"), namespace)
    cls: type[Any] = namespace["Adam"]
    return cls


#: The seed notebook's ``Adam`` class (see ``_NOTEBOOK_SOURCE``).
NotebookAdam = _load_notebook_adam()

#: Implementation names, in table order; ``notebook`` is the baseline of the ratios.
IMPLEMENTATIONS = (
    "notebook",
    "adam_update",
    "Adam.step",
    "torch-foreach",
    "torch-fused",
    "optax-jit",
    "optax-jit-donate",
)
_TORCH_IMPLEMENTATIONS = ("torch-foreach", "torch-fused")
_JAX_IMPLEMENTATIONS = ("optax-jit", "optax-jit-donate")
_NUMPY_IMPLEMENTATIONS = ("notebook", "adam_update", "Adam.step")

DEFAULT_SIZES = ("2x2", "1e3", "1e5", "1e6", "1e7", "mlp")
QUICK_SIZES = ("2x2", "1e3", "mlp-tiny")
DEFAULT_DTYPES = ("float64", "float32")
_SEED = 20240601
_MIB = float(1 << 20)
_PLOT_MISSING = (
    'bench: --plot needs matplotlib, which is not installed; pip install "adam-functional[plot]"'
)


# ---------------------------------------------------------------------------------------------
# Sizes and data


@attrs.frozen
class Size:
    """One size of the benchmark: a single array of ``shape``, or the MLP-shaped tree."""

    label: str
    shape: tuple[int, ...] | None = None
    mlp_width: int | None = None

    @property
    def n(self) -> int:
        """Number of parameters."""
        if self.shape is not None:
            return math.prod(self.shape)
        return sum(math.prod(s) for s in _mlp_shapes(self._width))

    @property
    def _width(self) -> int:
        assert self.mlp_width is not None
        return self.mlp_width

    def describe(self) -> str:
        if self.shape is not None:
            return str(self.shape)
        return f"dict of 25 layers {{'w', 'b'}}, width {self._width}"


_MLP_LAYERS = 25
_MLP_IN, _MLP_OUT = 32, 10


def _mlp_shapes(width: int) -> list[tuple[int, ...]]:
    dims = [_MLP_IN] + [width] * (_MLP_LAYERS - 1) + [_MLP_OUT]
    shapes: list[tuple[int, ...]] = []
    for d_in, d_out in itertools.pairwise(dims):
        shapes += [(d_in, d_out), (d_out,)]
    return shapes


def parse_size(token: str) -> Size:
    """Parses ``2x2``, ``1e6``, ``4000000``, ``mlp`` (width 128) or ``mlp-tiny`` (width 8)."""
    text = token.strip().lower()
    if text == "mlp":
        return Size("mlp25", mlp_width=128)
    if text == "mlp-tiny":
        return Size("mlp25-tiny", mlp_width=8)
    try:
        dims = tuple(float(part) for part in text.split("x"))
    except ValueError:
        dims = ()
    if not dims or not all(math.isfinite(d) and d >= 1 and d == int(d) for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected a size like 2x2, 1e6, 4000000 or mlp, got {token!r}"
        )
    return Size(token.strip(), shape=tuple(int(d) for d in dims))


def _make_data(size: Size, dtype: str) -> tuple[Any, Any]:
    """Returns (params, grads) for a size, from fixed seeds; the same values in every dtype."""
    rng = np.random.default_rng([_SEED, size.n])

    def leaf(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        p = rng.standard_normal(shape).astype(dtype)
        g = (1e-2 * rng.standard_normal(shape)).astype(dtype)
        # Gradients are shared by the NumPy implementations and must never be written.
        g.flags.writeable = False
        return p, g

    if size.shape is not None:
        return leaf(size.shape)
    shapes = iter(_mlp_shapes(size._width))
    params: dict[str, dict[str, np.ndarray]] = {}
    grads: dict[str, dict[str, np.ndarray]] = {}
    for i in range(_MLP_LAYERS):
        name = f"layer{i:02d}"
        (pw, gw), (pb, gb) = leaf(next(shapes)), leaf(next(shapes))
        params[name] = {"w": pw, "b": pb}
        grads[name] = {"w": gw, "b": gb}
    return params, grads


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for layer in tree.values() for leaf in (layer["w"], layer["b"])]
    return [tree]


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, dict):
        return {name: {k: fn(a) for k, a in layer.items()} for name, layer in tree.items()}
    return fn(tree)


def _nbytes(*trees: Any) -> int:
    total = 0
    for tree in trees:
        if tree is None:
            continue
        if isinstance(tree, np.ndarray):
            total += tree.nbytes
        elif isinstance(tree, dict):
            total += _nbytes(*tree.values())
        elif isinstance(tree, list | tuple):
            total += _nbytes(*tree)
    return total


# ---------------------------------------------------------------------------------------------
# Implementations


class Unsupported(Exception):
    """The implementation cannot run this case (reported as n/a with the reason)."""


class _Runner:
    """One implementation set up on one case; ``step`` makes one step and waits for it."""

    #: None when tracemalloc sees the implementation's memory, else why it does not.
    memory_unseen: str | None = None

    def step(self) -> None:
        raise NotImplementedError

    def output_nbytes(self) -> int:
        """Bytes of the arrays the last step had to return (0 for an in-place step)."""
        return 0


class _NotebookRunner(_Runner):
    def __init__(self, params: Any, grads: Any) -> None:
        self.opt = NotebookAdam()
        self.pairs = list(zip(_leaves(_map(np.copy, params)), _leaves(grads), strict=True))

    def step(self) -> None:
        step = self.opt.step
        for p, g in self.pairs:
            step(p, g)


class _PureRunner(_Runner):
    def __init__(self, params: Any, grads: Any) -> None:
        self.config = AdamConfig()
        self.params = _map(np.copy, params)
        self.grads = grads
        self.state = adam_init(self.params, self.config)

    def step(self) -> None:
        self.params, self.state = adam_update(self.params, self.grads, self.state, self.config)

    def output_nbytes(self) -> int:
        state = self.state
        return _nbytes(self.params, state.m, state.v, getattr(state, "v_max", None))


class _WrapperRunner(_Runner):
    def __init__(self, params: Any, grads: Any) -> None:
        self.opt = Adam()
        self.params = _map(np.copy, params)
        self.grads = grads

    def step(self) -> None:
        self.opt.step(self.params, self.grads)


class _TorchRunner(_Runner):
    memory_unseen = "tracemalloc cannot see torch's allocator"

    def __init__(self, torch: ModuleType, params: Any, grads: Any, *, fused: bool) -> None:
        self.torch = torch
        self.params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in _leaves(params)]
        for p, g in zip(self.params, _leaves(grads), strict=True):
            p.grad = torch.from_numpy(g.copy())
        kind = {"fused": True} if fused else {"foreach": True}
        try:
            self.opt = torch.optim.Adam(self.params, lr=1e-3, **kind)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Unsupported(f"torch: {exc}") from exc

    def step(self) -> None:
        with self.torch.no_grad():
            self.opt.step()


class _OptaxRunner(_Runner):
    memory_unseen = "tracemalloc cannot see XLA's allocator"

    def __init__(
        self, jax: ModuleType, optax: ModuleType, params: Any, grads: Any, *, donate: bool
    ) -> None:
        self.jax = jax
        jnp = jax.numpy
        # jnp.array copies, so donated buffers belong to this runner alone.
        self.params = _map(jnp.array, params)
        self.grads = _map(jnp.array, grads)
        if _leaves(self.params)[0].dtype != _leaves(params)[0].dtype:
            raise Unsupported(f"jax made {_leaves(self.params)[0].dtype} arrays")
        opt = optax.adam(1e-3)
        self.state = opt.init(self.params)

        def adam_step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.fn = jax.jit(adam_step, donate_argnums=(0, 1) if donate else ())

    def step(self) -> None:
        self.params, self.state = self.fn(self.params, self.state, self.grads)
        self.jax.block_until_ready((self.params, self.state))


@attrs.define
class _Libraries:
    torch: ModuleType | None = None
    jax: ModuleType | None = None
    optax: ModuleType | None = None
    notes: list[str] = attrs.Factory(list)
    missing: list[str] = attrs.Factory(list)  # wanted but not importable


def _make_runner(name: str, libs: _Libraries, params: Any, grads: Any) -> _Runner:
    if name == "notebook":
        return _NotebookRunner(params, grads)
    if name == "adam_update":
        return _PureRunner(params, grads)
    if name == "Adam.step":
        return _WrapperRunner(params, grads)
    if name in _TORCH_IMPLEMENTATIONS:
        assert libs.torch is not None
        return _TorchRunner(libs.torch, params, grads, fused=name == "torch-fused")
    if name in _JAX_IMPLEMENTATIONS:
        assert libs.jax is not None
        assert libs.optax is not None
        return _OptaxRunner(libs.jax, libs.optax, params, grads, donate=name.endswith("donate"))
    raise ValueError(f"unknown implementation {name!r}")


# ---------------------------------------------------------------------------------------------
# Measurement


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


@contextlib.contextmanager
def _gc_disabled() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


#: The clocks ``--clock`` offers, in nanoseconds: elapsed time, or the CPU time of the process
#: (all its threads, user and system), which leaves out the time other processes held the core.
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def _time_steps(step: Callable[[], None], steps: int, clock: Callable[[], int]) -> float:
    """Returns the mean time of ``steps`` consecutive steps, in microseconds."""
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps / 1e3


def _peak_extra_bytes(runner: _Runner) -> int:
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


def _default_repeats(n: int) -> int:
    # Larger arrays: fewer, longer samples; the spread is small next to the step time.
    if n <= 100_000:
        return 31
    if n <= 2_000_000:
        return 15
    return 7


def _run_group(
    size: Size,
    dtype: str,
    names: Sequence[str],
    libs: _Libraries,
    *,
    repeat: int | None,
    target_s: float,
    clock: Callable[[], int],
    log: Callable[[str], None],
) -> list[Result]:
    params, grads = _make_data(size, dtype)
    param_bytes = _nbytes(params)
    results: dict[str, Result] = {}
    runners: dict[str, _Runner] = {}
    for name in names:
        result = Result(name, size.label, size.n, size.describe(), dtype)
        results[name] = result
        try:
            runner = _make_runner(name, libs, params, grads)
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
            steps[name] = max(1, min(100_000, math.ceil(target_s * 1e6 / max(estimate, 1e-3))))
            results[name].steps_per_sample = steps[name]
        reps = repeat if repeat is not None else _default_repeats(size.n)
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


# ---------------------------------------------------------------------------------------------
# Environment


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _load_libraries(names: Sequence[str]) -> _Libraries:
    libs = _Libraries()
    if any(n in _TORCH_IMPLEMENTATIONS for n in names):
        libs.torch = _import("torch")
        if libs.torch is None:
            libs.missing.append("torch")
            libs.notes.append("torch is not installed: skipping torch-foreach, torch-fused")
    if any(n in _JAX_IMPLEMENTATIONS for n in names):
        jax, optax = _import("jax"), _import("optax")
        if jax is None or optax is None:
            missing = [m for m, mod in (("jax", jax), ("optax", optax)) if mod is None]
            libs.missing += missing
            libs.notes.append(
                f"{' and '.join(missing)} not installed: skipping optax-jit, optax-jit-donate"
            )
        else:
            libs.jax, libs.optax = jax, optax
    return libs


def _version(module: ModuleType | None) -> str | None:
    return None if module is None else str(getattr(module, "__version__", "unknown"))


def _backend() -> str | None:
    backend = getattr(adam_functional, "backend", None)
    if backend is None:
        return None
    try:
        value = backend() if callable(backend) else backend
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    return str(value)


@contextlib.contextmanager
def _threads(threads: int, libs: _Libraries) -> Iterator[str]:
    """Pins the process to ``threads`` cores and sizes the thread pools alike; restores all.

    The pools are torch's intra-op threads and numba's (imported by the package's numba backend
    when that is active); NumPy's elementwise operations run on one thread anyway.
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


@contextlib.contextmanager
def _jax_x64(libs: _Libraries) -> Iterator[None]:
    """Enables float64 in jax for the run (float32 arrays stay float32), then restores it."""
    if libs.jax is None:
        yield
        return
    config = libs.jax.config
    old = bool(config.read("jax_enable_x64") if hasattr(config, "read") else config.x64_enabled)
    libs.jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        libs.jax.config.update("jax_enable_x64", old)


# ---------------------------------------------------------------------------------------------
# Output


def _fmt_time(us: float | None) -> str:
    if us is None:
        return "n/a"
    return f"{us:.3g}" if us < 100 else f"{us:,.0f}"


def _fmt_mib(result: Result) -> tuple[str, str]:
    if result.peak_extra_mib is None or result.peak_extra_per_params is None:
        return "n/a", "n/a"
    return f"{result.peak_extra_mib:.3g}", f"{result.peak_extra_per_params:.2f}x"


def format_table(results: Sequence[Result]) -> str:
    """Returns the results as a text table, with the reasons for n/a rows below it."""
    header = (
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
    rows: list[tuple[str, ...]] = []
    reasons: list[str] = []
    for r in results:
        if r.status != "ok":
            reasons.append(f"  {r.implementation} {r.size} {r.dtype}: {r.status}: {r.reason}")
            rows.append((r.implementation, r.size, r.dtype, r.status, "", "", "", "", ""))
            continue
        ratio = "n/a" if r.ratio_vs_notebook is None else f"{r.ratio_vs_notebook:.2f}"
        rows.append(
            (
                r.implementation,
                r.size,
                r.dtype,
                _fmt_time(r.median_us),
                "n/a" if r.spread is None else f"{100 * r.spread:.0f}%",
                ratio,
                _fmt_time(r.first_call_us),
                *_fmt_mib(r),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2])]
        cells += [cell.rjust(w) for cell, w in zip(row[3:], widths[3:], strict=True)]
        return "  ".join(cells).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous: tuple[str, str] | None = None
    for r, row in zip(results, rows, strict=True):
        if previous is not None and (r.size, r.dtype) != previous:
            out.append("")
        previous = (r.size, r.dtype)
        out.append(line(row))
    if reasons:
        out += ["", "not measured:", *reasons]
    return "\n".join(out)


def _plot(path: str, results: Sequence[Result], title: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# Command line


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adam_functional.bench",
        description="Time and memory of one Adam step: adam_functional against the seed "
        "notebook's class, torch.optim.Adam and optax.adam (when installed). ratio = notebook "
        "time / implementation time (>1: faster than the notebook).",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        metavar="SIZE",
        help="sizes: NxM shapes, element counts (1e3, 4e6) or 'mlp' (50-leaf tree); "
        f"default {' '.join(DEFAULT_SIZES)}",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DEFAULT_DTYPES,
        default=list(DEFAULT_DTYPES),
        help="dtypes (default: float64 float32)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these implementations (names or comma lists): " + ", ".join(IMPLEMENTATIONS),
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        metavar="N",
        help="repetitions per implementation (default: 31, 15 or 7, falling with size)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: sizes {' '.join(QUICK_SIZES)}, 3 repetitions of short batches",
    )
    parser.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="pin the process to N cores and give torch N threads (default 1; 0: leave as is)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: CPU time of the process, steadier on a busy "
        "machine, and with --threads 1 the time the step would take on an idle core",
    )
    parser.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help='plot time per step against size (log-log); needs matplotlib: pip install "adam-functional[plot]"',  # noqa: E501
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (0, 1 if an implementation failed, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        names = _parse_only(args.only) if args.only else list(IMPLEMENTATIONS)
    except argparse.ArgumentTypeError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse's own errors and --help
        return exc.code if isinstance(exc.code, int) else 2

    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(path or "") or "."
        if path is not None and not os.path.isdir(folder):
            print(f"{parser.prog}: error: {option}: no folder {folder!r}", file=sys.stderr)
            return 2

    if args.plot is not None:
        try:
            importlib.import_module("matplotlib.figure")
            importlib.import_module("matplotlib.backends.backend_agg")
        except ImportError:
            print(_PLOT_MISSING, file=sys.stderr)
            return 2

    sizes: list[Size] = args.sizes or [
        parse_size(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    ]
    target_s = 0.001 if args.quick else 0.025
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else None)

    libs = _load_libraries(names)
    for note in libs.notes:
        print(f"note: {note}")
    names = [
        n
        for n in names
        if not (n in _TORCH_IMPLEMENTATIONS and libs.torch is None)
        and not (n in _JAX_IMPLEMENTATIONS and libs.jax is None)
    ]

    started = time.perf_counter()
    results: list[Result] = []
    backend = _backend()  # before sizing thread pools: it may import numba
    with _threads(args.threads, libs) as threads, _jax_x64(libs):
        meta: dict[str, Any] = {
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
            "clock": args.clock,
        }
        print(_header(meta, libs.missing))
        for size in sizes:
            for dtype in args.dtypes:
                results += _run_group(
                    size,
                    dtype,
                    names,
                    libs,
                    repeat=repeat,
                    target_s=target_s,
                    clock=CLOCKS[args.clock],
                    log=print,
                )
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["sizes"] = [s.label for s in sizes]
    meta["dtypes"] = list(args.dtypes)
    meta["implementations"] = names
    meta["notes"] = libs.notes
    meta["not_installed"] = libs.missing
    meta["method"] = (
        "median over interleaved repetitions of microseconds per step; ratio_vs_notebook = "
        "notebook median / implementation median; peak_extra = tracemalloc peak during one step "
        "above the memory before it, less the arrays the step returns"
    )

    print()
    print(format_table(results))
    print(f"\n{len(results)} rows in {meta['seconds']} s")
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "results": [attrs.asdict(r) for r in results]}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        title = f"Adam step, {meta['machine']}, {meta['cpu_count']} cores, threads {args.threads}"
        _plot(args.plot, results, title)
        print(f"wrote {args.plot}")
    return 1 if any(r.status == "error" for r in results) else 0


def _header(meta: dict[str, Any], missing: Sequence[str]) -> str:
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


if __name__ == "__main__":
    raise SystemExit(main())
