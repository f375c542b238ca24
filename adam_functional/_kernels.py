"""The arithmetic of one Adam step on one array: the only place the formula is written.

`adam_leaf` reads ``p``, ``g``, ``m``, ``v`` and writes the new ``p``, ``m``, ``v`` into
arrays it is given. The pure update gives it fresh arrays; the in-place wrapper gives it the arrays
it owns (donation). Either way it walks the data in blocks of `BLOCK_SIZE` elements, so that
its temporaries stay in cache and no full-size temporary is ever made.

Every elementwise operation is the notebook's, in the notebook's order, so float64 results are
bit-for-bit those of the notebook's class. float16 is computed in float32: NumPy's float16 rounds
``eps=1e-8`` to zero, which turns a zero gradient into ``0 / 0``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from adam_functional._records import AdamConfig

__all__ = ["BLOCK_SIZE", "Coefficients", "adam_leaf", "coefficients", "count_nonfinite"]

#: Elements per block. Seven block-sized operands and three temporaries of float64 take 640 KiB,
#: which stays in a core's L2 cache, while a block is long enough that NumPy's per-call overhead
#: is small next to the arithmetic.
BLOCK_SIZE = 8192


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


def coefficients(config: AdamConfig, t: int) -> Coefficients:
    """Returns the scalars of step ``t`` (1-based).

    The bias corrections ``1 - beta ** t`` are Python floats (float64) whatever the parameters'
    dtype, as in the notebook: ``t`` is an exact int, and ``beta ** t`` in float64 stays accurate
    where a float32 power would round ``1 - beta2 ** t`` to 0 for small ``t``.
    """
    lr = config.learning_rate(t)
    decoupled = config.decoupled_weight_decay
    return Coefficients(
        lr=lr,
        beta1=config.beta1,
        one_minus_beta1=1.0 - config.beta1,
        beta2=config.beta2,
        one_minus_beta2=1.0 - config.beta2,
        bias_correction1=1.0 - config.beta1**t,
        bias_correction2=1.0 - config.beta2**t,
        eps=config.eps,
        # The notebook applies L2 only when weight_decay > 0; keep that test, not "!= 0".
        l2=config.weight_decay if (config.weight_decay > 0 and not decoupled) else 0.0,
        decay=1.0 - lr * config.weight_decay if decoupled else None,
        maximize=config.maximize,
        amsgrad=config.amsgrad,
    )


def work_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a step computes in: the parameters' own, but float32 for float16."""
    return np.promote_types(dtype, np.float32)


def adam_leaf(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    v_max: np.ndarray | None,
    c: Coefficients,
    out_p: np.ndarray,
    out_m: np.ndarray,
    out_v: np.ndarray,
    out_v_max: np.ndarray | None,
) -> None:
    """Computes one Adam step for one array, writing the results into the ``out_`` arrays.

    All arrays are one-dimensional and of one length. ``p``, ``m``, ``v``, ``v_max`` and the
    outputs have the parameters' dtype; ``g`` may have any real dtype. An output may be the same
    array as the input it replaces (``out_m is m``), which is how the wrapper updates in place;
    no other overlap is allowed.

    Per element, with ``g`` negated when maximizing::

        g = g + l2 * p                      (L2 weight decay, when on)
        p = p * decay                       (decoupled weight decay, when on)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        v_max = max(v_max, v)               (AMSGrad, when on; then v_hat uses v_max)
        p = p - lr * (m / bc1) / (sqrt(v / bc2) + eps)
    """
    n = p.shape[0]
    work = work_dtype(p.dtype)
    cast = p.dtype != work
    size = min(n, BLOCK_SIZE)
    t1 = np.empty(size, work)
    t2 = np.empty(size, work)
    transform_g = g.dtype != work or c.maximize or c.l2 != 0.0
    gw = np.empty(size, work) if transform_g else None
    # Parameters, moments and their outputs are loaded into these when the storage dtype is
    # narrower than the work dtype (float16); otherwise the kernel works on the arrays directly.
    staged = [np.empty(size, work) for _ in range(4 if c.amsgrad else 3)] if cast else None

    for start in range(0, n, BLOCK_SIZE):
        stop = min(start + BLOCK_SIZE, n)
        k = stop - start
        pb, gb, mb, vb = p[start:stop], g[start:stop], m[start:stop], v[start:stop]
        opb, omb, ovb = out_p[start:stop], out_m[start:stop], out_v[start:stop]
        vmb = v_max[start:stop] if v_max is not None else None
        ovmb = out_v_max[start:stop] if out_v_max is not None else None
        if staged is not None:
            sp, sm, sv = staged[0][:k], staged[1][:k], staged[2][:k]
            np.copyto(sp, pb)
            np.copyto(sm, mb)
            np.copyto(sv, vb)
            svm = None
            if vmb is not None:
                svm = staged[3][:k]
                np.copyto(svm, vmb)
            _block(sp, gb, sm, sv, svm, c, sp, sm, sv, svm, t1[:k], t2[:k], gw)
            np.copyto(opb, sp, casting="same_kind")
            np.copyto(omb, sm, casting="same_kind")
            np.copyto(ovb, sv, casting="same_kind")
            if ovmb is not None and svm is not None:
                np.copyto(ovmb, svm, casting="same_kind")
        else:
            _block(pb, gb, mb, vb, vmb, c, opb, omb, ovb, ovmb, t1[:k], t2[:k], gw)


def _block(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    v_max: np.ndarray | None,
    c: Coefficients,
    out_p: np.ndarray,
    out_m: np.ndarray,
    out_v: np.ndarray,
    out_v_max: np.ndarray | None,
    t1: np.ndarray,
    t2: np.ndarray,
    gw: np.ndarray | None,
) -> None:
    # One block, all operands of the work dtype except g. Each line is one of the notebook's
    # operations with the same operands in the same order, so the rounding is the same.
    if gw is not None:
        gw = gw[: t1.shape[0]]
        if c.maximize:
            np.negative(g, out=gw, casting="same_kind")
        else:
            np.copyto(gw, g, casting="same_kind")
        if c.l2 != 0.0:
            np.multiply(p, c.l2, out=t1)
            np.add(gw, t1, out=gw)
        g = gw
    if c.decay is not None:
        # Decoupled decay rescales p before the step; out_p holds the decayed p until the end.
        np.multiply(p, c.decay, out=out_p)
        p = out_p
    np.multiply(m, c.beta1, out=out_m)
    np.multiply(g, c.one_minus_beta1, out=t1)
    np.add(out_m, t1, out=out_m)
    np.multiply(v, c.beta2, out=out_v)
    np.multiply(g, g, out=t1)
    np.multiply(t1, c.one_minus_beta2, out=t1)
    np.add(out_v, t1, out=out_v)
    second = out_v
    if c.amsgrad and v_max is not None and out_v_max is not None:
        np.maximum(v_max, out_v, out=out_v_max)
        second = out_v_max
    np.divide(out_m, c.bias_correction1, out=t1)
    np.multiply(t1, c.lr, out=t1)
    np.divide(second, c.bias_correction2, out=t2)
    np.sqrt(t2, out=t2)
    np.add(t2, c.eps, out=t2)
    np.divide(t1, t2, out=t1)
    np.subtract(p, t1, out=out_p)


def count_nonfinite(g: np.ndarray) -> int:
    """Returns how many elements of ``g`` are NaN or infinite, cheaply when there are none.

    A sum of finite numbers is finite unless it overflows, and any NaN or infinity makes the sum
    non-finite, so one summation (no allocation, one read) clears the common case. Only a
    non-finite sum pays for the elementwise count, in blocks.
    """
    if g.dtype.kind != "f" or g.size == 0:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(g, axis=None)
    if math.isfinite(float(total)):
        return 0
    flat = g.reshape(-1)
    blocks = (flat[i : i + BLOCK_SIZE] for i in range(0, flat.shape[0], BLOCK_SIZE))
    return sum(block.shape[0] - int(np.count_nonzero(np.isfinite(block))) for block in blocks)


_BACKENDS = ("numpy", "numba")
_ENVIRONMENT_VARIABLE = "ADAM_FUNCTIONAL_BACKEND"
_active: tuple[str, Callable[..., None]] | None = None


def _choose() -> tuple[str, Callable[..., None]]:
    """Picks the backend: the environment variable's, else numba when it imports, else NumPy."""
    forced = os.environ.get(_ENVIRONMENT_VARIABLE, "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise ValueError(
            f"{_ENVIRONMENT_VARIABLE}: expected one of {', '.join(_BACKENDS)}, got {forced!r}"
        )
    if forced == "numpy":
        return "numpy", adam_leaf
    if forced == "numba" or importlib.util.find_spec("numba") is not None:
        try:
            from adam_functional import _numba
        except ImportError as error:
            if forced == "numba":
                raise ImportError(
                    f"{_ENVIRONMENT_VARIABLE}=numba, but numba cannot be imported ({error}); "
                    'install it with: pip install "adam-functional[numba]"'
                ) from error
            return "numpy", adam_leaf
        return "numba", _numba.adam_leaf
    return "numpy", adam_leaf


def leaf_kernel() -> Callable[..., None]:
    """Returns the active backend's `adam_leaf`, choosing the backend at the first call."""
    global _active
    if _active is None:
        _active = _choose()
    return _active[1]


def backend() -> str:
    """Returns the name of the active compute backend, ``"numba"`` or ``"numpy"``.

    The compiled numba backend is used when numba is installed
    (``pip install "adam-functional[numba]"``); the environment variable
    ``ADAM_FUNCTIONAL_BACKEND=numpy`` or ``numba`` forces one, and forcing numba where it is
    missing raises ``ImportError``. Both give bit-for-bit the same results.

    Raises:
      ValueError: the environment variable names no backend.
      ImportError: it forces numba, which cannot be imported.
    """
    global _active
    if _active is None:
        _active = _choose()
    return _active[0]
