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

import numba
import numpy as np

from adam_functional import _kernels

__all__ = ["adam_leaf"]

# Below this many elements one thread does the work: starting the others costs more than it saves.
PARALLEL_THRESHOLD = 1 << 17
# Elements a thread takes at a time in the parallel loop.
_CHUNK = 1 << 14

# Positions in the coefficient array, which carries the scalars in the work dtype so that every
# operation rounds as NumPy's does with a Python float scalar (cast to the array's dtype first).
_LR, _BETA1, _OMB1, _BETA2, _OMB2, _BC1, _BC2, _EPS, _L2, _DECAY = range(10)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _element(p, g, m, v, vmax, coef, maximize, use_l2, use_decay, amsgrad, bc1, bc2):  # type: ignore[no-untyped-def]
    if maximize:
        g = -g
    if use_l2:
        g = g + p * coef[_L2]
    if use_decay:
        p = p * coef[_DECAY]
    m = m * coef[_BETA1] + g * coef[_OMB1]
    v = v * coef[_BETA2] + (g * g) * coef[_OMB2]
    second = v
    if amsgrad:
        # np.maximum: NaN wins on either side.
        if not (vmax >= v) or v != v:
            vmax = v
        second = vmax
    # A bias correction of exactly 1.0 divides nothing (see `_kernels._block`).
    numerator = (m / coef[_BC1] if bc1 else m) * coef[_LR]
    denominator = np.sqrt(second / coef[_BC2] if bc2 else second) + coef[_EPS]
    return p - numerator / denominator, m, v, vmax


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _serial(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    # Scalars and flags are read once into locals: read in the loop, LLVM would have to reload
    # them after every store (an output might alias them) and could not vectorize. The index
    # runs from 0, so LLVM can drop the check for negative indices too.
    maximize, use_l2, use_decay, amsgrad = flags[0], flags[1], flags[2], flags[3]
    bc1, bc2 = flags[4], flags[5]
    local = coef.copy()
    for i in range(p.shape[0]):
        vm = vmax[i] if amsgrad else v[i]
        new_p, new_m, new_v, new_vm = _element(
            p[i], g[i], m[i], v[i], vm, local, maximize, use_l2, use_decay, amsgrad, bc1, bc2
        )
        out_p[i] = new_p
        out_m[i] = new_m
        out_v[i] = new_v
        if amsgrad:
            out_vmax[i] = new_vm


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _parallel(p, g, m, v, vmax, out_p, out_m, out_v, out_vmax, coef, flags):  # type: ignore[no-untyped-def]
    n = p.shape[0]
    chunks = (n + _CHUNK - 1) // _CHUNK
    for chunk in numba.prange(chunks):
        a = chunk * _CHUNK
        b = min(n, a + _CHUNK)
        # An empty v_max (AMSGrad off) is passed whole: its chunk would be out of range.
        vm, ovm = (vmax[a:b], out_vmax[a:b]) if flags[3] else (vmax, out_vmax)
        _serial(
            p[a:b], g[a:b], m[a:b], v[a:b], vm, out_p[a:b], out_m[a:b], out_v[a:b], ovm, coef, flags
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
        ),
        dtype,
    )
    flags = np.array(
        (
            c.maximize,
            c.l2 != 0.0,
            c.decay is not None,
            c.amsgrad,
            c.bias_correction1 != 1.0,
            c.bias_correction2 != 1.0,
        ),
        np.bool_,
    )
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
    if n >= PARALLEL_THRESHOLD:
        _parallel(*arrays, coef, flags)
    else:
        _serial(*arrays, coef, flags)
    if not direct:
        out_p[...] = flat_out_p.reshape(out_p.shape)
