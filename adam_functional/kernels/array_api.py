"""The generic kernel: one Adam step written only with array-API operations.

Arrays of every library other than NumPy (JAX, PyTorch, CuPy, dask, array-api-strict) take this
kernel, through the namespace that array-api-compat gives them. It computes what the reference
kernel (`kernels.numpy`) computes, in the same order of operations (``docs/algorithm.md``), but
returns new arrays instead of writing into given ones, since some libraries' arrays cannot be
written (JAX) or are lazy (dask). It never converts to NumPy, so device arrays stay on their
device and lazy arrays stay lazy.

The scalars may be Python floats or, under ``jax.jit``, 0-d arrays of the work dtype.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from adam_functional.kernels import Coefficients, Inputs, Outputs
from adam_functional.kernels.numpy import fold

__all__ = ["adam_leaf", "work_dtype"]


def work_dtype(xp: ModuleType, p: Any, moments: Any) -> Any:
    """The dtype a step computes in: the wider of the parameters' and the moments', and at
    least float32 (as `kernels.work_dtype` for NumPy)."""
    wider = xp.result_type(p, moments)
    return xp.result_type(wider, xp.float32)


def adam_leaf(xp: ModuleType, x: Inputs, c: Coefficients) -> Outputs:
    """Computes one Adam step for one array of namespace ``xp`` and returns the new arrays.

    ``x.m`` (and ``x.v``, ``x.v_max``) have the moments' dtype; the results have the dtypes of
    the inputs they replace, on their device.
    """
    work = work_dtype(xp, x.p.dtype, x.m.dtype)
    p = xp.astype(x.p, work)
    g = xp.astype(x.g, work)
    if c.maximize:
        g = -g
    if c.l2 != 0.0:
        g = g + p * c.l2
    if c.decay is not None:
        p = p * c.decay
    m = xp.astype(x.m, work) * c.beta1 + g * c.one_minus_beta1
    v = xp.astype(x.v, work) * c.beta2 + (g * g) * c.one_minus_beta2
    second = v
    v_max = None
    if c.amsgrad and x.v_max is not None:
        # As np.maximum: NaN wins on either side.
        old = xp.astype(x.v_max, work)
        v_max = xp.where(xp.isnan(v) | (old < v), v, old)
        second = v_max
    step_m, step_g, eps, eps_root = fold(c)
    step = m * step_m
    if step_g is not None:
        step = step + g * step_g
    if c.eps_root != 0.0:
        second = second + eps_root
    new_p = p - step / (xp.sqrt(second) + eps)
    moments = x.m.dtype
    return Outputs(
        xp.astype(new_p, x.p.dtype),
        xp.astype(m, moments),
        xp.astype(v, moments),
        None if v_max is None else xp.astype(v_max, moments),
    )
