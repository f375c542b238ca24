"""The compiled backend: the kernel of `_kernels.adam_leaf` as one fused loop, with numba.

One pass per array reads ``p``, ``g``, ``m``, ``v`` once and writes the results once, in parallel
over cores for large arrays. The operations and their order are those of the NumPy kernel, with
no ``fastmath`` (which would let LLVM reassociate and fuse them), and NumPy's error model
(division by zero gives inf or NaN rather than raising), so the results are bit-for-bit the
same. float32 and float64 run here; other dtypes (float16, longdouble, or gradients of another
dtype than the parameters) take the NumPy kernel.

Compiled code is cached on disk (``cache=True``) where numba finds a writable place for it.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from adam_functional import _kernels

__all__ = ["adam_leaf"]

# Below this many elements one thread does the work: starting the others costs more than it saves.
PARALLEL_THRESHOLD = 1 << 17
# numba's default thread pool (workqueue) aborts the process when two threads enter parallel code
# at once; the parallel loop is entered by one step at a time.
_parallel_lock = threading.Lock()
# Elements a thread takes at a time in the parallel loop.
_CHUNK = 1 << 14
# Elements computed into scratch arrays at a time when updating in place (see `_staged`).
_STAGE = 1 << 11

# Positions in the coefficient array, which carries the scalars in the work dtype so that every
# operation rounds as NumPy's does with a Python float scalar (cast to the array's dtype first).
_LR, _BETA1, _OMB1, _BETA2, _OMB2, _BC1, _BC2, _EPS, _L2, _DECAY, _SIGN = range(11)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _serial(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    # The scalars are read once into local variables: read from an array in the loop, LLVM
    # would reload them after every store (an output might alias them). The loop has two
    # branches, both the same for every element, so that LLVM can hoist them and vectorize:
    # maximize is a product with -1.0, decoupled decay a product with 1.0 when off, and a bias
    # correction of 1.0 a division by 1.0, all exact. The index runs from 0, so LLVM can drop
    # the check for negative indices too.
    lr, beta1, omb1, beta2, omb2 = coef[_LR], coef[_BETA1], coef[_OMB1], coef[_BETA2], coef[_OMB2]
    bc1, bc2, eps, l2, decay = coef[_BC1], coef[_BC2], coef[_EPS], coef[_L2], coef[_DECAY]
    sign = coef[_SIGN]
    use_l2, amsgrad = flags[0], flags[1]
    for i in range(p.shape[0]):
        gi = g[i] * sign
        pi = p[i]
        if use_l2:
            gi = gi + pi * l2
        pi = pi * decay
        mi = m[i] * beta1 + gi * omb1
        vi = v[i] * beta2 + (gi * gi) * omb2
        second = vi
        if amsgrad:
            # np.maximum: NaN wins on either side.
            second = vmax[i]
            if second < vi or vi != vi:
                second = vi
            out_vmax[i] = second
        out_p[i] = pi - ((mi / bc1) * lr) / (np.sqrt(second / bc2) + eps)
        out_m[i] = mi
        out_v[i] = vi


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _staged(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    # In place, each output is also an input. LLVM vectorizes `_serial` behind a run-time check
    # that its outputs overlap no input, and in place that check fails every time: the loop
    # would run one element at a time. So the results go, a short stretch at a time, to scratch
    # arrays (which overlap nothing) and are copied from there; the copies stay in cache.
    n = p.shape[0]
    size = min(n, _STAGE)
    amsgrad = flags[1]
    sp, sm, sv = np.empty(size, p.dtype), np.empty(size, p.dtype), np.empty(size, p.dtype)
    svm = np.empty(size if amsgrad else 0, p.dtype)
    for a in range(0, n, _STAGE):
        b = min(n, a + _STAGE)
        k = b - a
        vm, ovm = (vmax[a:b], svm[:k]) if amsgrad else (vmax, svm)
        _serial(p[a:b], g[a:b], m[a:b], v[a:b], vm, sp[:k], sm[:k], sv[:k], ovm, coef, flags)
        for i in range(k):
            out_p[a + i] = sp[i]
            out_m[a + i] = sm[i]
            out_v[a + i] = sv[i]
        if amsgrad:
            for i in range(k):
                out_vmax[a + i] = svm[i]


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _parallel(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags, in_place):  # type: ignore[no-untyped-def]
    n = p.shape[0]
    chunks = (n + _CHUNK - 1) // _CHUNK
    for chunk in numba.prange(chunks):
        a = chunk * _CHUNK
        b = min(n, a + _CHUNK)
        # An empty v_max (AMSGrad off) is passed whole: its chunk would be out of range.
        vm, ovm = (vmax[a:b], out_vmax[a:b]) if flags[1] else (vmax, out_vmax)
        if in_place:
            _staged(
                p[a:b],
                g[a:b],
                m[a:b],
                v[a:b],
                vm,
                out_p[a:b],
                out_m[a:b],
                out_v[a:b],
                ovm,
                coef,
                flags,
            )
        else:
            _serial(
                p[a:b],
                g[a:b],
                m[a:b],
                v[a:b],
                vm,
                out_p[a:b],
                out_m[a:b],
                out_v[a:b],
                ovm,
                coef,
                flags,
            )


_NO_V_MAX = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0)}


def adam_leaf(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    v_max: np.ndarray | None,
    c: _kernels.Coefficients,
    out_p: np.ndarray,
    out_m: np.ndarray,
    out_v: np.ndarray,
    out_v_max: np.ndarray | None,
) -> None:
    """`_kernels.adam_leaf`, compiled; same arguments, same results bit for bit."""
    dtype = p.dtype
    if dtype not in _NO_V_MAX or g.dtype != dtype or not dtype.isnative:
        _kernels.adam_leaf(p, g, m, v, v_max, c, out_p, out_m, out_v, out_v_max)
        return
    coef = np.array(
        (
            c.lr,
            c.beta1,
            c.one_minus_beta1,
            c.beta2,
            c.one_minus_beta2,
            c.bias_correction1,
            c.bias_correction2,
            c.eps,
            c.l2,
            1.0 if c.decay is None else c.decay,
            -1.0 if c.maximize else 1.0,
        ),
        dtype,
    )
    flags = np.array((c.l2 != 0.0, c.amsgrad), np.bool_)
    none = _NO_V_MAX[dtype]
    # The loops take flat C-contiguous arrays: reshape(-1) is a view of a C-contiguous array
    # and a C-ordered copy of any other; a parameter of another layout is written back after.
    direct = out_p.flags.c_contiguous
    flat_out_p = out_p.reshape(-1) if direct else np.empty(out_p.size, dtype)
    arrays = (
        p.reshape(-1),
        g.reshape(-1),
        m.reshape(-1),
        v.reshape(-1),
        none if v_max is None else v_max.reshape(-1),
        flat_out_p,
        out_m.reshape(-1),
        out_v.reshape(-1),
        none if out_v_max is None else out_v_max.reshape(-1),
    )
    n = flat_out_p.shape[0]
    in_place = out_m is m
    if n >= PARALLEL_THRESHOLD:
        with _parallel_lock:
            _parallel(*arrays, coef, flags, in_place)
    elif in_place:
        _staged(*arrays, coef, flags)
    else:
        _serial(*arrays, coef, flags)
    if not direct:
        out_p[...] = flat_out_p.reshape(out_p.shape)
