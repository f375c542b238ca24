"""The kernels: one Adam step on one array, the scalars it needs, and the choice of backend.

A kernel is a function with the signature of `Kernel`. It reads the `Inputs` ``p``, ``g``,
``m``, ``v`` (and ``v_max``) and writes the new values into the `Outputs` it is given: fresh
arrays for the pure update, the arrays themselves for the in-place wrapper (donation). Everything
a kernel may assume has been checked before it is called (see ``adam_functional._step``).

Backends are modules of this package, one per backend, each with an ``adam_leaf`` kernel and a
``supports(p, g, moments)`` test of the dtypes it computes. `kernels.numpy` holds the reference
form of the formula, which ``docs/algorithm.md`` states; every other backend is held to it bit
for bit. This module is the one place a backend is chosen: `BACKENDS` lists them, and a new
backend joins by adding its module and its name there.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from adam_functional._records import AdamConfig

# What users call: the registry, the choice of backend and a kernel's signature. The plumbing
# below (`select`, `coefficients`, `scratch`, ...) is the package's own.
__all__ = [
    "BACKENDS",
    "ENVIRONMENT_VARIABLE",
    "Coefficients",
    "Inputs",
    "Kernel",
    "Outputs",
    "backend",
    "use_backend",
]

#: The backends, the reference first and the fastest last: the last that imports is used unless
#: the environment names one. Each maps to the module that implements it and the extra that
#: installs what it needs.
BACKENDS: dict[str, tuple[str, str | None]] = {
    "numpy": ("adam_functional.kernels.numpy", None),
    "numba": ("adam_functional.kernels.numba", "numba"),
}
#: The reference backend, always there, which takes every dtype.
REFERENCE = "numpy"
#: Names a backend to use instead of the first that imports.
ENVIRONMENT_VARIABLE = "ADAM_FUNCTIONAL_BACKEND"


_LARGEST_EXPONENT = 1 << 1000


class Coefficients(NamedTuple):
    """The scalars of one step, computed once per step from the config and the step count."""

    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    bias_correction1: float
    bias_correction2: float
    eps: float
    l2: float
    decay: float | None
    maximize: bool
    amsgrad: bool
    #: With Nesterov momentum, ``1 - beta1 ** (t + 1)``; else None.
    bias_correction1_next: float | None
    eps_root: float


class Inputs(NamedTuple):
    """What a kernel reads for one parameter: its value, gradient and moments."""

    p: np.ndarray
    g: np.ndarray
    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray | None  # With AMSGrad.


class Outputs(NamedTuple):
    """Where a kernel writes the new parameter and moments."""

    p: np.ndarray
    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray | None


class Kernel(Protocol):
    """One Adam step on one array: reads ``x`` and writes ``out``.

    All arrays have the parameter's shape. ``p``, ``m``, ``v``, ``v_max`` and the outputs have
    the parameter's dtype; ``g`` may have any real dtype. The outputs for the moments are
    C-contiguous; ``p``, ``g`` and ``out.p`` may have any layout. An output may be the same array
    as the input it replaces (``out.m is x.m``), which is how the wrapper updates in place; no
    other overlap is allowed. The checks have run before: a kernel warns of nothing and raises
    nothing, whatever the arithmetic meets (an underflow, or a NaN it was asked to propagate).
    """

    def __call__(self, x: Inputs, c: Coefficients, out: Outputs) -> None: ...


# Scratch buffers kept between steps, per thread: a buffer made afresh at every step would be
# memory the C library hands back and the kernel page-faults in again, at every step.
_scratch = threading.local()
# Views of the buffers by shape, kept too (a view costs a microsecond); at most this many.
_SCRATCH_VIEWS = 256


def scratch(name: str, shape: int | tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A scratch array of ``shape`` and ``dtype``, over a buffer this thread keeps under ``name``
    (grown when too small): its values are whatever the last user left."""
    views: dict[tuple[str, np.dtype, Any], np.ndarray] | None = getattr(_scratch, "views", None)
    if views is None:
        views = _scratch.views = {}
        _scratch.buffers = {}
    view = views.get((name, dtype, shape))
    if view is not None:
        return view
    buffers: dict[tuple[str, np.dtype], np.ndarray] = _scratch.buffers
    size = shape if isinstance(shape, int) else math.prod(shape)
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.shape[0] < size:
        buffer = buffers[name, dtype] = np.empty(size, dtype)
        # Views of the buffer this one replaces: made anew over the new one when next asked.
        for key in [key for key in views if key[:2] == (name, dtype)]:
            del views[key]
    view = buffer[:size] if isinstance(shape, int) else buffer[:size].reshape(shape)
    if len(views) >= _SCRATCH_VIEWS:
        views.clear()
    views[name, dtype, shape] = view
    return view


def flat(x: Inputs, out: Outputs) -> tuple[Inputs, Outputs]:
    """``x`` and ``out`` as 1-D arrays that a loop walks in one order, C order.

    ``reshape(-1)`` is a view of a C-contiguous array and a C-ordered copy of any other; a
    parameter of another layout is computed into a scratch array, which `write_back` copies back.
    """
    flat_p = ravel(out.p) if out.p.flags.c_contiguous else np.empty(out.p.size, out.p.dtype)
    flat_x = Inputs(
        ravel(x.p), ravel(x.g), ravel(x.m), ravel(x.v), None if x.v_max is None else ravel(x.v_max)
    )
    v_max = None if out.v_max is None else ravel(out.v_max)
    return flat_x, Outputs(flat_p, ravel(out.m), ravel(out.v), v_max)


def ravel(a: np.ndarray) -> np.ndarray:
    """``a`` as a 1-D array in C order: itself, a view, or (another layout) a copy."""
    return a if a.ndim == 1 and a.flags.c_contiguous else a.reshape(-1)


def write_back(out: Outputs, flat_out: Outputs) -> None:
    """Copies the parameter computed by a loop over `flat` arrays to where it belongs."""
    if not out.p.flags.c_contiguous:
        out.p[...] = flat_out.p.reshape(out.p.shape)


def coefficients(config: AdamConfig, t: Any, xp: Any = None, work: Any = None) -> Coefficients:
    """Returns the scalars of step ``t`` (1-based): the one place they are made.

    The bias corrections ``1 - beta ** t`` are Python floats (float64) whatever the parameters'
    dtype, as in the notebook: ``t`` is an exact int, and ``beta ** t`` in float64 stays accurate
    where a float32 power would round ``1 - beta2 ** t`` to 0 for small ``t``. Under tracing
    (``jax.jit``) ``t`` is a 0-d integer array of namespace ``xp``, and the scalars that depend
    on it are 0-d arrays of the dtype ``work``.

    Raises:
      ValueError: a schedule gives an invalid rate at step ``t``.
    """
    if isinstance(t, int):
        lr = config.learning_rate(t)
        bias_correction1, bias_correction2 = bias_corrections(config.beta1, config.beta2, t)
        following = bias_corrections(config.beta1, 0.0, t + 1)[0] if config.nesterov else None
    else:
        lr = config.lr(t) if callable(config.lr) else config.lr
        steps = xp.astype(t, work)
        bias_correction1 = _traced_correction(xp, config.beta1, steps)
        bias_correction2 = _traced_correction(xp, config.beta2, steps)
        following = _traced_correction(xp, config.beta1, steps + 1.0) if config.nesterov else None
    weight_decay, decoupled = config.weight_decay, config.decoupled_weight_decay
    # Positional: this runs once per step, and keyword construction costs a microsecond.
    return Coefficients(
        lr,
        config.beta1,
        1.0 - config.beta1,
        config.beta2,
        1.0 - config.beta2,
        bias_correction1,
        bias_correction2,
        config.eps,
        # The notebook applies L2 only when weight_decay > 0; keep that test, not "!= 0".
        weight_decay if (weight_decay > 0 and not decoupled) else 0.0,
        1.0 - lr * weight_decay if decoupled else None,
        config.maximize,
        config.amsgrad,
        following,
        config.eps_root,
    )


def _traced_correction(xp: Any, beta: float, steps: Any) -> Any:
    """``1 - beta ** steps`` for a 0-d array ``steps``, as ``-expm1(steps * log(beta))`` with
    ``log(beta)`` from float64: within a few ulps of the float64 value even in float32, where
    ``1 - beta ** steps`` would lose up to 1e-5."""
    if beta == 0.0:
        return xp.ones_like(steps)
    return -xp.expm1(steps * math.log(beta))


# By id(config): a weak reference that tells whether the id still names the config, and its
# `constants`; cleared when it grows past a few configs.
_CONSTANTS: dict[int, tuple[Any, tuple[float, ...] | None]] = {}


def constants(config: AdamConfig) -> tuple[float, ...] | None:
    """For a config with a constant learning rate and no option but L2 weight decay, the
    scalars of `coefficients` that do not depend on the step, ``(lr, beta1, 1 - beta1, beta2,
    1 - beta2, l2, eps)``, which the kernel of a few elements takes (with
    `numpy.small_scalars`); else None."""
    entry = _CONSTANTS.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    from adam_functional.kernels.numpy import is_plain

    found = None
    if type(config.lr) is float:
        c = coefficients(config, 1)
        if is_plain(c):
            found = (c.lr, c.beta1, c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.l2, c.eps)
    if len(_CONSTANTS) >= 64:
        _CONSTANTS.clear()
    _CONSTANTS[id(config)] = (weakref.ref(config), found)
    return found


def bias_corrections(beta1: float, beta2: float, t: int) -> tuple[float, float]:
    """``1 - beta1 ** t`` and ``1 - beta2 ** t``, the bias corrections of step ``t``, in float64.

    ``beta ** t`` is 0.0 (or 1.0 for ``0.0 ** 0``) long before ``t`` reaches ``2 ** 1000``, and
    Python cannot raise a float to an int beyond float's range: the exponent is capped there.
    """
    t = min(t, _LARGEST_EXPONENT)
    return 1.0 - beta1**t, 1.0 - beta2**t


_WORK_DTYPES: dict[tuple[np.dtype, np.dtype | None], np.dtype] = {}


def work_dtype(dtype: np.dtype, moments: np.dtype | None = None) -> np.dtype:
    """The dtype a step computes in: the wider of the parameters' and the moments', and at least
    float32.

    NumPy's float16 rounds ``eps=1e-8`` to zero, which would turn a zero gradient into ``0 / 0``.
    """
    key = (dtype, moments)
    work = _WORK_DTYPES.get(key)
    if work is None:
        wider = dtype if moments is None else np.promote_types(dtype, moments)
        work = _WORK_DTYPES[key] = np.promote_types(wider, np.float32)
    return work


class _Backend(NamedTuple):
    name: str
    adam_leaf: Kernel
    supports: Callable[[np.dtype, np.dtype, np.dtype, int], bool]
    #: The backend's quick gradient test, if it has one (see `squares_fit`).
    squares_fit: Callable[..., bool | None] | None
    #: For a backend that loads what it needs at the first step that wants it: loads it now,
    #: and says whether it could (then a warning has said why not).
    load: Callable[[], bool] | None
    #: Whether that loading failed.
    failed: Callable[[], bool] | None
    #: The checked step of a few elements (see `small_step`), if the backend has one.
    small_step: Callable[..., bool] | None


_active: _Backend | None = None
_reference: _Backend | None = None
# The kernel chosen for each (parameter, gradient, moment) dtype triple under the active backend.
_selected: dict[tuple[np.dtype, np.dtype, np.dtype], Kernel] = {}


def _load(name: str) -> _Backend:
    module = importlib.import_module(BACKENDS[name][0])
    return _Backend(
        name,
        module.adam_leaf,
        module.supports,
        getattr(module, "squares_fit", None),
        getattr(module, "load", None),
        getattr(module, "failed", None),
        getattr(module, "small_step", None),
    )


def _choose() -> _Backend:
    """The environment variable's backend, else the last of `BACKENDS` that imports."""
    forced = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"{ENVIRONMENT_VARIABLE}: expected one of {', '.join(BACKENDS)}, got {forced!r}"
            )
        try:
            chosen = _load(forced)
            # Forced, it is wanted whatever the steps' sizes: what it loads late, load now.
            if chosen.load is not None and not chosen.load():
                raise ImportError(f"{forced} failed to load")
            return chosen
        except ImportError as error:
            raise ImportError(
                f"{ENVIRONMENT_VARIABLE}={forced}, but {forced} cannot be imported ({error}); "
                f'install it with: pip install "adam-functional[{BACKENDS[forced][1]}]"'
            ) from error
    for name, (_, extra) in reversed(BACKENDS.items()):
        if extra is None or importlib.util.find_spec(extra) is not None:
            try:
                return _load(name)
            except ImportError:  # Installed but broken: the next one.
                continue
    raise ImportError(f"no backend of {list(BACKENDS)} imports")


def _resolve() -> _Backend:
    global _active, _reference, _selected
    if _active is None:
        _selected = {}
        _active = _choose()
        _reference = _active if _active.name == REFERENCE else _load(REFERENCE)
    return _active


def select(p: np.dtype, g: np.dtype, moments: np.dtype, total: int = 0) -> Kernel:
    """Returns the kernel for parameters, gradients and moments of these dtypes, in a step of
    ``total`` elements: the active backend's when it supports them, else the reference's, which
    supports every floating dtype.

    The first call chooses the backend (reading the environment, which may raise), and a backend
    may load what it needs (numba) here, so the step calls this before it writes anything.
    """
    if _active is None:
        _resolve()
    key = (p, g, moments)
    kernel = _selected.get(key)
    if kernel is None:
        active = _resolve()
        assert _reference is not None
        if active.supports(p, g, moments, total):
            kernel = _selected[key] = active.adam_leaf
        else:  # Not remembered: a larger step may load what the active backend needs.
            kernel = _reference.adam_leaf
    return kernel


#: What `small_step` takes: the arrays ``(p, g, m, v, out_p, out_m, out_v)`` and the folded
#: scalars ``(beta1, one_minus_beta1, beta2, one_minus_beta2, l2, step_m, eps)`` (see
#: `numpy.fold`), as plain tuples: a named tuple costs half a microsecond to make, a tenth of
#: such a step.
SmallArrays = tuple[np.ndarray, ...]
SmallScalars = tuple[float, ...]


def small_step(arrays: SmallArrays, scalars: SmallScalars) -> bool:
    """One step of float64 or float32 arrays of one shape and dtype and at most
    `numpy.SCALAR_SIZE` elements, with no option but L2 weight decay (`numpy.is_plain`), by the
    active backend, checked as it goes: it writes the C-contiguous outputs (which may be the
    inputs themselves) and returns True when every new ``v`` is finite, else writes nothing and
    returns False (also for a dtype the backend does not take here: the reference takes
    float64 only). The results are `adam_leaf`'s, bit for bit. ``g`` may share memory with
    ``p``: every input is read before anything is written.
    """
    backend = _active if _active is not None else _resolve()
    if backend.small_step is None:  # A backend without one: the reference's.
        assert _reference is not None
        assert _reference.small_step is not None
        return _reference.small_step(arrays, scalars)
    return backend.small_step(arrays, scalars)


def selection() -> tuple[object, int]:
    """A token of the kernels `select` gives now: `same_selection` says whether it still
    holds. It ends when the backend changes, or when `select` settles a kernel it did not have
    (as when numba loads at a large step: the reference's kernels, lent until then, may then
    give way)."""
    return _selected, len(_selected)


def same_selection(token: tuple[object, int]) -> bool:
    """Whether `select` gives each dtype triple the kernel it gave when `selection` made
    ``token``."""
    return token[0] is _selected and token[1] == len(_selected)


def squares_fit(g: np.ndarray, work: np.dtype) -> bool:
    """Whether the squares of gradient ``g`` (in the dtype ``work``) are all finite, without NaN:
    the quick test of a gradient, in one pass. False also when it cannot tell (a sum of squares
    that overflows though no square does): the caller then looks value by value."""
    backend = _resolve()
    if backend.squares_fit is not None and g.dtype == work and g.size >= _COMPILED_CHECK_MIN:
        found = backend.squares_fit(g, _square_root_of_largest(work))
        if found is not None:
            return found
    assert _reference is not None
    assert _reference.squares_fit is not None
    return bool(_reference.squares_fit(g, work))


# Below this many elements a compiled call costs more than NumPy's sum of squares.
_COMPILED_CHECK_MIN = 1 << 13
_ROOTS: dict[np.dtype, float] = {}


def _square_root_of_largest(dtype: np.dtype) -> float:
    root = _ROOTS.get(dtype)
    if root is None:
        root = _ROOTS[dtype] = float(np.sqrt(np.finfo(dtype).max))
    return root


def backend() -> str:
    """Returns the name of the active compute backend, ``"numba"`` or ``"numpy"``.

    The compiled numba backend is used when numba is installed
    (``pip install "adam-functional[numba]"``); the environment variable
    ``ADAM_FUNCTIONAL_BACKEND=numpy`` or ``numba`` forces one, and forcing numba where it is
    missing raises ``ImportError``. Both give bit-for-bit the same results. numba is imported at
    the first step of 65,536 elements or more (at once, when forced); if it then fails to import,
    a warning says so, the NumPy kernels take the steps, and this says ``"numpy"``.

    Raises:
      ValueError: the environment variable names no backend.
      ImportError: it forces numba, which cannot be imported.
    """
    active = _resolve()
    if active.failed is not None and active.failed():
        assert _reference is not None
        return _reference.name
    return active.name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Makes backend ``name`` the active one inside the ``with`` block, then restores the choice.

    For comparing backends in one process (the tests do); not thread-safe.

    Raises:
      ValueError: ``name`` is not in `BACKENDS`.
      ImportError: the backend cannot be imported.
    """
    global _active, _reference, _selected
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {', '.join(BACKENDS)}, got {name!r}")
    before = _active, _reference
    _active = _load(name)
    _reference = _active if name == REFERENCE else _load(REFERENCE)
    _selected = {}
    # Compared with another backend, this one computes every size itself.
    if _active.load is not None:
        _active.load()
    try:
        yield
    finally:
        _active, _reference = before
        _selected = {}
