"""The compiled backend: the reference kernel (`kernels.numpy`) as one fused loop, with numba.

One pass per array reads ``p``, ``g``, ``m``, ``v`` once and writes the results once, in parallel
over cores for large arrays (one step at a time; serially in a process forked from one whose
parallel loops ran on GNU OpenMP, whose threads do not survive a fork). The operations and their
order are those of the NumPy kernel, with no ``fastmath`` (which would let LLVM reassociate and fuse
them), and NumPy's error model (division by zero gives inf or NaN rather than raising), so the
results are bit-for-bit the same. float32 and float64 run here (`supports`); the registry gives
other dtypes (float16, longdouble, or gradients of another dtype than the parameters) to the
reference kernel, and so does this module to arrays of a few float64 elements (the reference's
Python-float loop, quicker there than the arguments of a compiled call), but for the one-array step
of `small_step`: a loop of its own (``kernels._numba_small``, loaded at the first such step once the
loops are) that takes its scalars as arguments, at about a microsecond a call.

The loops live in ``kernels._numba_loops``, which this module imports, and numba with it, at the
first step of at least `COMPILED_MIN` elements (`load`): a process whose steps are all smaller
never pays numba's start-up, and its steps run on the reference kernel, with the same bits. The
per-step scalars come from the reference's `fold`, so they are the same floats.

LLVM vectorizes the loops (packed ``vmulpd``, ``vdivpd``, ``vsqrtpd`` on AVX2) behind a run-time
check that no output overlaps an input. The in-place wrapper's outputs are its inputs, so it has a
loop of its own, ``in_place``, that reads and writes each array at one index and passes each
array once, for which that check passes.

Compiled code is cached on disk (``cache=True``) where numba finds a writable place for it
(beside the loops' file, else numba's user cache folder; ``NUMBA_CACHE_DIR`` chooses another).
Inputs are passed read-only and C-contiguous, outputs writable, so each loop compiles to one
signature per dtype whatever the caller's arrays are.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from adam_functional.kernels import Coefficients, Inputs, Outputs, flat, ravel, write_back
from adam_functional.kernels import numpy as reference
from adam_functional.kernels.numpy import fold

if TYPE_CHECKING:
    from adam_functional.kernels import SmallArrays, SmallScalars

__all__ = [
    "COMPILED_MIN",
    "PARALLEL_THRESHOLD",
    "adam_leaf",
    "failed",
    "load",
    "small_step",
    "squares_fit",
    "supports",
]

# Below this many elements one thread does the work: starting the others costs more than it saves.
PARALLEL_THRESHOLD = 1 << 17
#: numba and the compiled loops are loaded at the first step of at least this many elements in
#: all (or by `load`): importing numba and loading its cache takes about half a second, which a
#: step of fewer elements would not win back for thousands of steps. Until then the steps run on
#: the reference kernel, with the same results bit for bit.
COMPILED_MIN = 1 << 16
# numba's thread pool of last resort (workqueue) aborts the process when two threads enter
# parallel code at once; the parallel loops are entered by one step at a time.
_parallel_lock = threading.Lock()
_load_lock = threading.Lock()
# Whether this process was forked (at any depth) from one whose parallel code had started GNU
# OpenMP's threads, which cannot start again in the child: numba ends a child that enters
# parallel code with SIGTERM ("fork() called from a process already using GNU OpenMP"). Such a
# process takes the serial loops (`_after_fork_in_child`).
_serial_only = False
_loops: ModuleType | None = None
# The modules of this package's kernels whose import failed: never tried again.
_failed: set[str] = set()

if importlib.util.find_spec("numba") is None:
    raise ModuleNotFoundError("No module named 'numba'", name="numba")


def _after_fork_in_child() -> None:
    """In a forked child: new locks (a thread of the parent may have held one as it forked),
    and the serial loops from now on where the parent's parallel code ran on GNU OpenMP."""
    global _parallel_lock, _load_lock, _serial_only
    _parallel_lock = threading.Lock()
    _load_lock = threading.Lock()
    _serial_only = _serial_only or _gnu_openmp_started()


def _gnu_openmp_started() -> bool:
    """Whether numba's parallel code has run in this process on GNU OpenMP's threads (TBB,
    workqueue and other OpenMPs start again in a forked child)."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        layer = numba.threading_layer()
    except ValueError:  # No parallel code has run: a child starts threads of its own.
        return False
    omp = sys.modules.get("numba.np.ufunc.omppool")
    return bool(layer == "omp" and getattr(omp, "openmp_vendor", "GNU") == "GNU")


if hasattr(os, "register_at_fork"):  # Not on Windows, which has no fork.
    os.register_at_fork(after_in_child=_after_fork_in_child)


def failed() -> bool:
    """Whether numba failed to import at `load` (the reference kernel then takes the steps)."""
    return "_numba_loops" in _failed


def load() -> bool:
    """Imports numba and the compiled loops, once; whether they are there. A numba that fails to
    import is reported once, as a warning, and the reference kernel takes the steps."""
    global _loops
    if _loops is None:
        with _load_lock:
            if _loops is None:
                _loops = _imported(
                    "_numba_loops", "numba cannot be imported", "the NumPy kernels take the steps"
                )
    return _loops is not None


def _imported(name: str, problem: str, instead: str) -> ModuleType | None:
    """Module ``name`` of this package's kernels, imported once (under `_load_lock`); None when
    its import fails, which is remembered (before the warning that says so, which may be
    raised where warnings are errors) and not tried again."""
    if name in _failed:
        return None
    try:
        return importlib.import_module(f"adam_functional.kernels.{name}")
    except Exception as error:  # A broken install may raise anything as it imports or compiles.
        _failed.add(name)
        warnings.warn(f"{problem} ({error}); {instead}", RuntimeWarning, stacklevel=4)
        return None


# Empty stand-ins for v_max without AMSGrad: writable for the outputs, read-only for the inputs,
# as the arrays they stand for, so that both kinds of call share one compiled signature.
_NO_V_MAX: dict[np.dtype, np.ndarray] = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0),
}
_NO_V_MAX_INPUT = {dtype: empty.view() for dtype, empty in _NO_V_MAX.items()}
for _empty in _NO_V_MAX_INPUT.values():
    _empty.flags.writeable = False


def supports(p: np.dtype, g: np.dtype, moments: np.dtype, total: int) -> bool:
    """float32 and float64 parameters in native byte order, with gradients and moments of their
    dtype, in a step of ``total`` elements: once the loops are loaded, or when ``total`` is at
    least `COMPILED_MIN` (which loads them)."""
    if not (p in _NO_V_MAX and g == p and moments == p and p.isnative):
        return False
    return _loops is not None or (total >= COMPILED_MIN and load())


def small_step(arrays: SmallArrays, scalars: SmallScalars) -> bool:
    """`kernels.small_step`, compiled once the loops are loaded, for float32 too (the
    reference's until then): its arrays' ``ravel`` are views, but for inputs of another layout,
    which it copies."""
    compiled = _small if _small is not None else _load_small()
    if compiled is None:
        return reference.small_step(arrays, scalars)
    p, g, m, v, out_p, out_m, out_v = arrays
    beta1, one_minus_beta1, beta2, one_minus_beta2, l2, step_m, eps = scalars
    flat_p, flat_m, flat_v = p.ravel(), m.ravel(), v.ravel()
    return bool(
        compiled.small(
            flat_p,
            g.ravel(),
            flat_m,
            flat_v,
            flat_p if out_p is p else out_p.ravel(),
            flat_m if out_m is m else out_m.ravel(),
            flat_v if out_v is v else out_v.ravel(),
            # `_element`'s scalars: no decoupled decay, no maximize, no Nesterov, no eps_root.
            beta1,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            l2,
            1.0,
            step_m,
            0.0,
            0.0,
            l2 != 0.0,
        )
    )


# The module of the compiled small step, once `_load_small` has imported it.
_small: ModuleType | None = None


def _load_small() -> ModuleType | None:
    """Imports the compiled small step (compiling it, or loading it from numba's cache) once the
    loops are loaded; None until then, or when it fails (then the reference's step serves)."""
    global _small
    if _loops is not None and _small is None:
        with _load_lock:
            if _small is None:
                _small = _imported(
                    "_numba_small",
                    "numba cannot compile the step of a few elements",
                    "the general kernels take those steps",
                )
    return _small


def squares_fit(g: np.ndarray, limit: float) -> bool | None:
    """Whether every ``|g|`` is at most ``limit`` (and none is NaN), in one compiled pass; None
    when the loops are not loaded or do not take ``g``'s dtype."""
    if _loops is None or g.dtype not in _NO_V_MAX or not g.dtype.isnative:
        return None
    return bool(_loops.squares_fit(_read_only(ravel(g)), g.dtype.type(limit)))


def _read_only(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only, C-contiguous array, so that every call compiles to one signature."""
    if a.flags.writeable or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a).view()
        a.flags.writeable = False
    return a


# The scalars of the last step as the loops take them, with the step's `Coefficients` and dtype
# they were made for: the leaves of a tree share one set, made once.
_last_scalars: tuple[Coefficients | None, np.dtype | None, np.ndarray, np.ndarray] = (
    None,
    None,
    np.empty(0),
    np.empty(0, np.bool_),
)


def _scalars_of(c: Coefficients, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    global _last_scalars
    last = _last_scalars
    if last[0] is c and last[1] == dtype:
        return last[2], last[3]
    step_m, step_g, eps, eps_root = fold(c)
    # In the work dtype, as NumPy casts a Python float scalar: a value beyond float32's range
    # becomes inf there too, silently.
    with np.errstate(over="ignore"):
        coef = _coefficient_array(c, dtype, step_m, step_g, eps, eps_root)
    flags = np.array((c.l2 != 0.0, c.amsgrad, step_g is not None, c.maximize), np.bool_)
    _last_scalars = (c, dtype, coef, flags)
    return coef, flags


def _coefficient_array(
    c: Coefficients,
    dtype: np.dtype,
    step_m: float,
    step_g: float | None,
    eps: float,
    eps_root: float,
) -> np.ndarray:
    return np.array(
        (
            c.beta1,
            c.one_minus_beta1,
            c.beta2,
            c.one_minus_beta2,
            eps,
            c.l2,
            1.0 if c.decay is None else c.decay,
            step_m,
            0.0 if step_g is None else step_g,
            eps_root,
        ),
        dtype,
    )


def adam_leaf(x: Inputs, c: Coefficients, out: Outputs) -> None:
    """The reference `adam_leaf`, compiled; same arguments, same results bit for bit."""
    dtype = x.p.dtype
    loops = _loops
    if loops is None or (x.p.size <= reference.SCALAR_SIZE and reference.scalar_fits(x, out)):
        # Not loaded (a step that chose this kernel loaded it, but `use_backend` may have
        # changed since); or a few float64 elements, for which the reference's Python-float
        # loop is quicker than building the arguments of a compiled call. Same bits.
        reference.adam_leaf(x, c, out)
        return
    coef, flags = _scalars_of(c, dtype)
    if out.m is x.m and out.p is x.p and x.p.flags.c_contiguous:
        # In place, the common case: every array C-contiguous, the moments the outputs.
        vmax = _NO_V_MAX[dtype] if x.v_max is None else ravel(x.v_max)
        arrays = (ravel(x.p), _read_only(ravel(x.g)), ravel(x.m), ravel(x.v), vmax)
        _in_place(loops, arrays, coef, flags)
        return
    none = _NO_V_MAX[dtype]
    flat_x, flat_out = flat(x, out)
    g = _read_only(flat_x.g)
    if out.m is x.m:
        # In place: the moments are the outputs. A parameter of another layout is computed in
        # the scratch array `flat` gave, which `write_back` copies back.
        p = flat_out.p
        if out.p is not x.p or not out.p.flags.c_contiguous:
            np.copyto(p, flat_x.p)
        vmax = none if flat_out.v_max is None else flat_out.v_max
        _in_place(loops, (p, g, flat_out.m, flat_out.v, vmax), coef, flags)
    else:
        inputs = (
            _read_only(flat_x.p),
            g,
            _read_only(flat_x.m),
            _read_only(flat_x.v),
            _NO_V_MAX_INPUT[dtype] if flat_x.v_max is None else _read_only(flat_x.v_max),
        )
        outputs = (*flat_out[:3], none if flat_out.v_max is None else flat_out.v_max)
        if _parallel(inputs[0].shape[0]):
            with _parallel_lock:
                loops.parallel(*inputs, *outputs, coef, flags)
        else:
            loops.serial(*inputs, *outputs, coef, flags)
    write_back(out, flat_out)


def _parallel(n: int) -> bool:
    """Whether a loop over ``n`` elements takes the parallel loops."""
    return n >= PARALLEL_THRESHOLD and not _serial_only


def _in_place(loops: ModuleType, arrays: tuple[np.ndarray, ...], coef: Any, flags: Any) -> None:
    """The in-place loop over flat ``arrays`` ``(p, g, m, v, v_max)``, parallel when large."""
    if _parallel(arrays[0].shape[0]):
        with _parallel_lock:
            loops.parallel_in_place(*arrays, coef, flags)
    else:
        loops.in_place(*arrays, coef, flags)
