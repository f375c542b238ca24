"""The compiled backend: the reference kernel (`kernels.numpy`) as one fused loop, with numba.

One pass per array reads ``p``, ``g``, ``m``, ``v`` once and writes the results once, in parallel
over cores for large arrays. The operations and their order are those of the NumPy kernel, with
no ``fastmath`` (which would let LLVM reassociate and fuse them), and NumPy's error model
(division by zero gives inf or NaN rather than raising), so the results are bit-for-bit the
same. float32 and float64 run here (`supports`); the registry gives other dtypes (float16,
longdouble, or gradients of another dtype than the parameters) to the reference kernel.

numba compiles each loop from its own Python source, so `_element` restates the arithmetic of
the reference kernel's ``_block`` (and of ``docs/algorithm.md``) rather than calling it; the
per-step scalars come from the same `fold`, so they are the same floats.

LLVM vectorizes the loops (packed ``vmulpd``, ``vdivpd``, ``vsqrtpd`` on AVX2) behind a run-time
check that no output overlaps an input. The in-place wrapper's outputs are its inputs, so it has a
loop of its own, `_in_place`, that reads and writes each array at one index and passes each array
once, for which that check passes.

Compiled code is cached on disk (``cache=True``) where numba finds a writable place for it
(beside this file, else numba's user cache folder; ``NUMBA_CACHE_DIR`` chooses another). Inputs
are passed read-only and C-contiguous, outputs writable, so each loop compiles to one signature
per dtype whatever the caller's arrays are.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from adam_functional.kernels import Coefficients, Inputs, Outputs, flat, ravel, write_back
from adam_functional.kernels import numpy as reference
from adam_functional.kernels.numpy import fold

__all__ = ["PARALLEL_THRESHOLD", "adam_leaf", "supports"]

# Below this many elements one thread does the work: starting the others costs more than it saves.
PARALLEL_THRESHOLD = 1 << 17
# numba's default thread pool (workqueue) aborts the process when two threads enter parallel code
# at once; the parallel loop is entered by one step at a time.
_parallel_lock = threading.Lock()
# Elements a thread takes at a time in the parallel loops.
_CHUNK = 1 << 14

# Positions in the coefficient array, which carries the scalars in the work dtype so that every
# operation rounds as NumPy's does with a Python float scalar (cast to the array's dtype first).
_BETA1, _OMB1, _BETA2, _OMB2, _EPS, _L2, _DECAY, _SIGN, _STEP_M, _STEP_G, _EPS_ROOT = range(11)
# Positions in the flags array: loop-invariant branches, which LLVM hoists out of the loop.
_USE_L2, _AMSGRAD, _NESTEROV = range(3)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _scalars(coef, flags):  # type: ignore[no-untyped-def]
    # The scalars as local values, read once: read from an array in the loop, LLVM would reload
    # them after every store (an output might alias the array).
    c = (
        coef[0],
        coef[1],
        coef[2],
        coef[3],
        coef[4],
        coef[5],
        coef[6],
        coef[7],
        coef[8],
        coef[9],
        coef[10],
    )
    return c, (flags[0], flags[1], flags[2])


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _element(pi, gi, mi, vi, vmi, coef, flags):  # type: ignore[no-untyped-def]
    # One element: the operations of the NumPy kernel's `_block`, in its order. Maximize is a
    # product with -1.0, decoupled decay one with 1.0 when off and eps_root of 0.0 a sum with
    # 0.0, all exact, so that the only branches are the flags, the same for every element,
    # which LLVM hoists out of the loop.
    gi = gi * coef[_SIGN]
    if flags[_USE_L2]:
        gi = gi + pi * coef[_L2]
    pi = pi * coef[_DECAY]
    mi = mi * coef[_BETA1] + gi * coef[_OMB1]
    vi = vi * coef[_BETA2] + (gi * gi) * coef[_OMB2]
    second = vi
    if flags[_AMSGRAD]:
        # np.maximum: NaN wins on either side.
        second = vmi
        if second < vi or vi != vi:
            second = vi
    step = mi * coef[_STEP_M]
    if flags[_NESTEROV]:
        step = step + gi * coef[_STEP_G]
    denom = np.sqrt(second + coef[_EPS_ROOT]) + coef[_EPS]
    return pi - step / denom, mi, vi, second


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _serial(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    # Into outputs apart from the inputs: LLVM vectorizes behind a run-time check that no
    # output overlaps an input. The index runs from 0, so LLVM can drop the check for negative
    # indices too.
    c, f = _scalars(coef, flags)
    amsgrad = f[_AMSGRAD]
    for i in range(p.shape[0]):
        vmi = vmax[i] if amsgrad else p[i]  # p[i]: of the dtype, and unused
        pi, mi, vi, second = _element(p[i], g[i], m[i], v[i], vmi, c, f)
        out_p[i] = pi
        out_m[i] = mi
        out_v[i] = vi
        if amsgrad:
            out_vmax[i] = second


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _in_place(p, g, m, v, vmax, coef, flags):  # type: ignore[no-untyped-def]
    # In place each result goes where its input came from, and no array is passed twice: LLVM's
    # run-time check that the arrays do not overlap passes, and the loop is vectorized.
    c, f = _scalars(coef, flags)
    amsgrad = f[_AMSGRAD]
    for i in range(p.shape[0]):
        vmi = vmax[i] if amsgrad else p[i]  # p[i]: of the dtype, and unused
        pi, mi, vi, second = _element(p[i], g[i], m[i], v[i], vmi, c, f)
        p[i] = pi
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vmax[i] = second


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _parallel(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    n = p.shape[0]
    amsgrad = flags[_AMSGRAD]
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        a = chunk * _CHUNK
        b = min(n, a + _CHUNK)
        # An empty v_max (AMSGrad off) is passed whole: its chunk would be out of range.
        vm, ovm = (vmax[a:b], out_vmax[a:b]) if amsgrad else (vmax, out_vmax)
        _serial(
            p[a:b], g[a:b], m[a:b], v[a:b], vm, out_p[a:b], out_m[a:b], out_v[a:b], ovm, coef, flags
        )


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _parallel_in_place(p, g, m, v, vmax, coef, flags):  # type: ignore[no-untyped-def]
    n = p.shape[0]
    amsgrad = flags[_AMSGRAD]
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        a = chunk * _CHUNK
        b = min(n, a + _CHUNK)
        vm = vmax[a:b] if amsgrad else vmax
        _in_place(p[a:b], g[a:b], m[a:b], v[a:b], vm, coef, flags)


# Empty stand-ins for v_max without AMSGrad: writable for the outputs, read-only for the inputs,
# as the arrays they stand for, so that both kinds of call share one compiled signature.
_NO_V_MAX: dict[np.dtype, np.ndarray] = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0),
}
_NO_V_MAX_INPUT = {dtype: empty.view() for dtype, empty in _NO_V_MAX.items()}
for _empty in _NO_V_MAX_INPUT.values():
    _empty.flags.writeable = False


def supports(p: np.dtype, g: np.dtype, moments: np.dtype) -> bool:
    """float32 and float64 parameters in native byte order, with gradients and moments of their
    dtype."""
    return p in _NO_V_MAX and g == p and moments == p and p.isnative


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
    coef = np.array(
        (
            c.beta1,
            c.one_minus_beta1,
            c.beta2,
            c.one_minus_beta2,
            eps,
            c.l2,
            1.0 if c.decay is None else c.decay,
            -1.0 if c.maximize else 1.0,
            step_m,
            0.0 if step_g is None else step_g,
            eps_root,
        ),
        dtype,
    )
    flags = np.array((c.l2 != 0.0, c.amsgrad, step_g is not None), np.bool_)
    _last_scalars = (c, dtype, coef, flags)
    return coef, flags


def adam_leaf(x: Inputs, c: Coefficients, out: Outputs) -> None:
    """The reference `adam_leaf`, compiled; same arguments, same results bit for bit."""
    dtype = x.p.dtype
    if x.p.size <= reference.SCALAR_SIZE and reference.scalar_fits(x, out):
        # A few float64 elements: the reference's Python-float loop is quicker than building
        # the arguments of a compiled call, and gives the same bits.
        reference.scalar(x, c, out)
        return
    coef, flags = _scalars_of(c, dtype)
    if out.m is x.m and out.p is x.p and x.p.flags.c_contiguous:
        # In place, the common case: every array C-contiguous, the moments the outputs.
        n = x.p.size
        vmax = _NO_V_MAX[dtype] if x.v_max is None else ravel(x.v_max)
        arrays = (ravel(x.p), _read_only(ravel(x.g)), ravel(x.m), ravel(x.v), vmax)
        if n >= PARALLEL_THRESHOLD:
            with _parallel_lock:
                _parallel_in_place(*arrays, coef, flags)
        else:
            _in_place(*arrays, coef, flags)
        return
    none = _NO_V_MAX[dtype]
    flat_x, flat_out = flat(x, out)
    n = flat_out.p.shape[0]
    g = _read_only(flat_x.g)
    if out.m is x.m:
        # In place: the moments are the outputs. A parameter of another layout is computed in
        # the scratch array `flat` gave, which `write_back` copies back.
        p = flat_out.p
        if out.p is not x.p or not out.p.flags.c_contiguous:
            np.copyto(p, flat_x.p)
        vmax = none if flat_out.v_max is None else flat_out.v_max
        arrays = (p, g, flat_out.m, flat_out.v, vmax)
        if n >= PARALLEL_THRESHOLD:
            with _parallel_lock:
                _parallel_in_place(*arrays, coef, flags)
        else:
            _in_place(*arrays, coef, flags)
    else:
        inputs = (
            _read_only(flat_x.p),
            g,
            _read_only(flat_x.m),
            _read_only(flat_x.v),
            _NO_V_MAX_INPUT[dtype] if flat_x.v_max is None else _read_only(flat_x.v_max),
        )
        outputs = (*flat_out[:3], none if flat_out.v_max is None else flat_out.v_max)
        if n >= PARALLEL_THRESHOLD:
            with _parallel_lock:
                _parallel(*inputs, *outputs, coef, flags)
        else:
            _serial(*inputs, *outputs, coef, flags)
    write_back(out, flat_out)
