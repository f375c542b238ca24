"""The compiled loops of the numba backend (`kernels.numba`), which imports this module, and so
numba, at the first step that uses them.

numba compiles each loop from its own Python source, so `_element` restates the arithmetic of
the reference kernel's ``_block`` (and of ``docs/algorithm.md``) rather than calling it.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["in_place", "parallel", "parallel_in_place", "serial", "squares_fit"]

# Elements a thread takes at a time in the parallel loops.
_CHUNK = 1 << 14
# Elements of each quarter the finiteness check reads between two looks at what it found.
_CHECK_CHUNK = 1 << 12

# Positions in the coefficient array, which carries the scalars in the work dtype so that every
# operation rounds as NumPy's does with a Python float scalar (cast to the array's dtype first).
_BETA1, _OMB1, _BETA2, _OMB2, _EPS, _L2, _DECAY, _STEP_M, _STEP_G, _EPS_ROOT = range(10)
# Positions in the flags array: loop-invariant branches, which LLVM hoists out of the loop.
_USE_L2, _AMSGRAD, _NESTEROV, _MAXIMIZE = range(4)


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
    )
    return c, (flags[0], flags[1], flags[2], flags[3])


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _element(pi, gi, mi, vi, vmi, coef, flags):  # type: ignore[no-untyped-def]
    # One element: the operations of the NumPy kernel's `_block`, in its order. Decoupled decay
    # is a product with 1.0 when off, exact, so that the only branches are the flags and whether
    # eps_root is 0.0, the same for every element, which LLVM hoists out of the loop. Maximize
    # negates, as np.negative: the sign bit flips, a NaN's too (a product with -1.0 keeps a
    # NaN's sign on x86).
    if flags[_MAXIMIZE]:
        gi = -gi
    if flags[_USE_L2]:
        gi = gi + pi * coef[_L2]
    pi = pi * coef[_DECAY]
    mi = mi * coef[_BETA1] + gi * coef[_OMB1]
    vi = vi * coef[_BETA2] + (gi * gi) * coef[_OMB2]
    second = vi
    if flags[_AMSGRAD]:
        # np.maximum(v_max, v): NaN wins on either side, and a tie (+0.0 and -0.0) gives v.
        second = vmi
        if not (vmi > vi or vmi != vmi):
            second = vi
    step = mi * coef[_STEP_M]
    if flags[_NESTEROV]:
        step = step + gi * coef[_STEP_G]
    # eps_root only when it is not 0.0, as the reference: -0.0 + 0.0 would be +0.0.
    root_of = second + coef[_EPS_ROOT] if coef[_EPS_ROOT] != 0.0 else second
    denom = np.sqrt(root_of) + coef[_EPS]
    return pi - step / denom, mi, vi, second


@numba.njit(cache=True, nogil=True, error_model="numpy")
def serial(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
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
def in_place(p, g, m, v, vmax, coef, flags):  # type: ignore[no-untyped-def]
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
def parallel(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    n = p.shape[0]
    amsgrad = flags[_AMSGRAD]
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        a = chunk * _CHUNK
        b = min(n, a + _CHUNK)
        # An empty v_max (AMSGrad off) is passed whole: its chunk would be out of range.
        vm, ovm = (vmax[a:b], out_vmax[a:b]) if amsgrad else (vmax, out_vmax)
        serial(
            p[a:b], g[a:b], m[a:b], v[a:b], vm, out_p[a:b], out_m[a:b], out_v[a:b], ovm, coef, flags
        )


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def parallel_in_place(p, g, m, v, vmax, coef, flags):  # type: ignore[no-untyped-def]
    n = p.shape[0]
    amsgrad = flags[_AMSGRAD]
    for chunk in numba.prange((n + _CHUNK - 1) // _CHUNK):
        a = chunk * _CHUNK
        b = min(n, a + _CHUNK)
        vm = vmax[a:b] if amsgrad else vmax
        in_place(p[a:b], g[a:b], m[a:b], v[a:b], vm, coef, flags)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def squares_fit(g, limit):  # type: ignore[no-untyped-def]
    # Whether every |g| <= limit (False for NaN). The array is read as four quarters side by
    # side: four streams keep more loads in flight than one, and the check reads at the
    # memory's speed (one stream took twice as long). Each quarter's chunk is a slice indexed
    # from 0, so LLVM drops the check for negative indices and vectorizes the OR over the
    # chunk; a chunk that fails ends the walk.
    n = g.shape[0]
    q = n // 4
    for start in range(0, q, _CHECK_CHUNK):
        k = min(_CHECK_CHUNK, q - start)
        a = g[start : start + k]
        b = g[q + start : q + start + k]
        c = g[2 * q + start : 2 * q + start + k]
        d = g[3 * q + start : 3 * q + start + k]
        bad = False
        for i in range(k):
            bad |= not (abs(a[i]) <= limit)
            bad |= not (abs(b[i]) <= limit)
            bad |= not (abs(c[i]) <= limit)
            bad |= not (abs(d[i]) <= limit)
        if bad:
            return False
    bad = False
    for i in range(4 * q, n):
        bad |= not (abs(g[i]) <= limit)
    return not bad
