"""The compiled step of a few elements (`kernels.small_step`) of the numba backend, which
imports this module at the first such step once its loops (``kernels._numba_loops``) are
loaded: its two signatures, float64 and float32, compile (or load from numba's cache) then,
not at the first large step.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from adam_functional.kernels._numba_loops import _element

__all__ = ["small"]


def _small_signature(dtype: Any) -> Any:
    # `small`'s arrays, 1-D and C-contiguous, aligned or not: four inputs, read-only (writeable
    # arrays are taken as such too), three outputs; then the ten scalars of `_element`, of
    # the arrays' dtype (Python floats are rounded to it as NumPy rounds them).
    inputs = numba.types.Array(dtype, 1, "C", readonly=True, aligned=False)
    outputs = numba.types.Array(dtype, 1, "C", aligned=False)
    return numba.types.boolean(*[inputs] * 4, *[outputs] * 3, *[dtype] * 10, numba.types.boolean)


@numba.njit(
    [_small_signature(numba.types.float64), _small_signature(numba.types.float32)],
    cache=True,
    nogil=True,
    error_model="numpy",
)
def small(p, g, m, v, out_p, out_m, out_v, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, l2):  # type: ignore[no-untyped-def]
    # `kernels.small_step`: a few elements with no option but L2, whose scalars come as
    # arguments (an array of them would cost more to make than the step), one signature per
    # dtype, compiled once. The outputs may be the inputs, and g may share memory with p: g is
    # copied, and each element is read before it is written. Nothing is written unless every
    # new v is finite.
    coef = (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9)
    f = (l2, False, False, False)
    gs = g.copy()
    n = p.shape[0]
    for i in range(n):
        vi = _element(p[i], gs[i], m[i], v[i], p[i], coef, f)[2]
        if not np.isfinite(vi):
            return False
    for i in range(n):
        pi, mi, vi, _ = _element(p[i], gs[i], m[i], v[i], p[i], coef, f)
        out_p[i] = pi
        out_m[i] = mi
        out_v[i] = vi
    return True
