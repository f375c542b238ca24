"""The arithmetic of one Adam step on one array, and the choice of backend.

This is the reference form of the formula; `_numba` holds its compiled twin, which the tests hold
to the same results bit for bit.

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
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from adam_functional._records import AdamConfig

__all__ = [
    "BLOCK_SIZE",
    "Coefficients",
    "adam_leaf",
    "backend",
    "coefficients",
    "gradient_problem",
]

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
    beta1, beta2, weight_decay = config.beta1, config.beta2, config.weight_decay
    decoupled = config.decoupled_weight_decay
    # Positional: this runs once per step, and keyword construction costs a microsecond.
    return Coefficients(
        lr,
        beta1,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        1.0 - beta1**t,
        1.0 - beta2**t,
        config.eps,
        # The notebook applies L2 only when weight_decay > 0; keep that test, not "!= 0".
        weight_decay if (weight_decay > 0 and not decoupled) else 0.0,
        1.0 - lr * weight_decay if decoupled else None,
        config.maximize,
        config.amsgrad,
    )


_WORK_DTYPES: dict[np.dtype, np.dtype] = {}


def work_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a step computes in: the parameters' own, but float32 for float16."""
    work = _WORK_DTYPES.get(dtype)
    if work is None:
        work = _WORK_DTYPES[dtype] = np.promote_types(dtype, np.float32)
    return work


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

    All arrays have the parameter's shape. ``p``, ``m``, ``v``, ``v_max`` and the outputs have
    the parameter's dtype; ``g`` may have any real dtype. The outputs for the moments are
    C-contiguous; ``p``, ``g`` and ``out_p`` may have any layout. An output may be the same array
    as the input it replaces (``out_m is m``), which is how the wrapper updates in place; no other
    overlap is allowed.

    Per element, with ``g`` negated when maximizing::

        g = g + l2 * p                      (L2 weight decay, when on)
        p = p * decay                       (decoupled weight decay, when on)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        v_max = max(v_max, v)               (AMSGrad, when on; then v_hat uses v_max)
        p = p - lr * (m / bc1) / (sqrt(v / bc2) + eps)
    """
    work = work_dtype(p.dtype)
    transform_g = g.dtype != work or c.maximize or c.l2 != 0.0
    if p.size <= BLOCK_SIZE and p.dtype == work:
        # One block: ufuncs take the arrays as they are, whatever their layout, no reshaping.
        shape = p.shape
        gw = np.empty(shape, work) if transform_g else None
        t1, t2 = np.empty(shape, work), np.empty(shape, work)
        _block(p, g, m, v, v_max, c, out_p, out_m, out_v, out_v_max, t1, t2, gw)
        return
    # Blocks walk flat arrays: reshape(-1) is a view of a C-contiguous array and a C-ordered
    # copy of any other, so that every array is walked in the same order.
    direct = out_p.flags.c_contiguous
    flat_out_p = out_p.reshape(-1) if direct else np.empty(out_p.size, out_p.dtype)
    _blocks(
        p.reshape(-1),
        g.reshape(-1),
        m.reshape(-1),
        v.reshape(-1),
        None if v_max is None else v_max.reshape(-1),
        c,
        flat_out_p,
        out_m.reshape(-1),
        out_v.reshape(-1),
        None if out_v_max is None else out_v_max.reshape(-1),
        work,
        transform_g,
    )
    if not direct:
        out_p[...] = flat_out_p.reshape(out_p.shape)


def _blocks(
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
    work: np.dtype,
    transform_g: bool,
) -> None:
    # Flat arrays, in blocks of BLOCK_SIZE elements: every temporary stays in cache. (Splitting
    # the blocks over threads was measured slower: the GIL between NumPy calls serializes them.)
    end = p.shape[0]
    size = min(end, BLOCK_SIZE)
    t1, t2 = np.empty(size, work), np.empty(size, work)
    gw = np.empty(size, work) if transform_g else None
    # Parameters, moments and their outputs are loaded into these when the storage dtype is
    # narrower than the work dtype (float16); otherwise the kernel works on the arrays directly.
    cast = p.dtype != work
    staged = [np.empty(size, work) for _ in range(4 if c.amsgrad else 3)] if cast else None
    for start in range(0, end, BLOCK_SIZE):
        stop = min(start + BLOCK_SIZE, end)
        k = stop - start
        gwb = None if gw is None else gw[:k]
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
            _block(sp, gb, sm, sv, svm, c, sp, sm, sv, svm, t1[:k], t2[:k], gwb)
            np.copyto(opb, sp, casting="same_kind")
            np.copyto(omb, sm, casting="same_kind")
            np.copyto(ovb, sv, casting="same_kind")
            if ovmb is not None and svm is not None:
                np.copyto(ovmb, svm, casting="same_kind")
        else:
            _block(pb, gb, mb, vb, vmb, c, opb, omb, ovb, ovmb, t1[:k], t2[:k], gwb)


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
    # One block, all operands of one shape and of the work dtype except g. Each line is one of
    # the notebook's operations with the same operands in the same order, so the rounding is the
    # same.
    if gw is not None:
        # Cast first, then negate: negated in its own dtype, int8's -128 would stay -128.
        np.copyto(gw, g, casting="same_kind")
        if c.maximize:
            np.negative(gw, out=gw)
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
    # Once beta ** t is below half an ulp of 1, a bias correction is exactly 1.0 and dividing by
    # it gives back its operand bit for bit: the division is skipped (after some 350 steps for
    # m with beta1 = 0.9, some 36,000 for v with beta2 = 0.999).
    if c.bias_correction1 != 1.0:
        np.divide(out_m, c.bias_correction1, out=t1)
        np.multiply(t1, c.lr, out=t1)
    else:
        np.multiply(out_m, c.lr, out=t1)
    if c.bias_correction2 != 1.0:
        np.divide(second, c.bias_correction2, out=t2)
        np.sqrt(t2, out=t2)
    else:
        np.sqrt(second, out=t2)
    np.add(t2, c.eps, out=t2)
    np.divide(t1, t2, out=t1)
    np.subtract(p, t1, out=out_p)


_SQUARE_LIMITS: dict[np.dtype, np.floating[Any]] = {}


def _square_limit(work: np.dtype) -> np.floating[Any]:
    """The largest magnitude whose square is finite in ``work``.

    A scalar of that dtype, not a Python float: compared with a gradient's values it then
    promotes them instead of being rounded to their dtype, and longdouble's limit does not
    overflow float64.
    """
    limit = _SQUARE_LIMITS.get(work)
    if limit is None:
        limit = _SQUARE_LIMITS[work] = np.sqrt(np.finfo(work).max)
    return limit


_LARGEST: dict[np.dtype, float] = {}


def _largest(work: np.dtype) -> float:
    """The largest finite value of ``work`` as a Python float (float64's, for longdouble)."""
    largest = _LARGEST.get(work)
    if largest is None:
        largest = _LARGEST[work] = float(min(np.finfo(work).max, np.finfo(np.float64).max))
    return largest


def gradient_problem(g: np.ndarray, dtype: np.dtype) -> str | None:
    """Says what is wrong with gradient ``g`` of parameters of ``dtype``, or returns None.

    A gradient is wrong when it holds NaN or infinity, or a value whose square overflows the
    dtype the step computes in (the parameters' own, float32 for float16; a float64 gradient of
    float32 parameters is judged in float32): ``v`` would become infinite and the coordinate
    would never move again. A sum of squares clears both at once in the common case: it is at
    most the dtype's largest value exactly when no such value is there, unless the sum itself
    is too large. It is taken in chunks of `BLOCK_SIZE` elements (``np.vdot``: no allocation,
    one read, and too short for a BLAS library to start threads). Only a gradient that fails is
    looked at value by value, to say what is wrong.
    """
    if g.size == 0:
        return None
    work = work_dtype(dtype)
    if g.dtype.kind != "f":
        # Integers are finite, and the square of any int64 fits float32; only uint64 can reach
        # float32's limit, and integer sums would wrap around, so it is looked at value by value.
        if g.dtype != np.uint64:
            return None
    else:
        # np.vdot checks no floating-point flags: no warning, even under np.seterr(all="raise").
        largest = _largest(work)
        if g.size <= BLOCK_SIZE:
            if float(np.vdot(g, g)) <= largest:  # False for NaN.
                return None
        else:
            flat = g.reshape(-1)
            chunks = (flat[i : i + BLOCK_SIZE] for i in range(0, flat.shape[0], BLOCK_SIZE))
            if all(float(np.vdot(chunk, chunk)) <= largest for chunk in chunks):
                return None
    limit = _square_limit(work)
    with np.errstate(over="ignore", invalid="ignore"):
        flat = g.reshape(-1)
        nonfinite = huge = 0
        first_nonfinite = first_huge = -1
        for start in range(0, flat.shape[0], BLOCK_SIZE):
            block = flat[start : start + BLOCK_SIZE]
            bad = ~np.isfinite(block)
            big = (np.abs(block) > limit) & ~bad
            count_bad, count_big = int(np.count_nonzero(bad)), int(np.count_nonzero(big))
            if count_bad and first_nonfinite < 0:
                first_nonfinite = start + int(np.argmax(bad))
            if count_big and first_huge < 0:
                first_huge = start + int(np.argmax(big))
            nonfinite += count_bad
            huge += count_big

    def where(index: int) -> str:
        position = tuple(int(i) for i in np.unravel_index(index, g.shape))
        return f"first at index {position}: {flat[index].item()}"

    if nonfinite:
        plural = "" if nonfinite == 1 else "s"
        return f"{nonfinite} NaN or infinite value{plural} of {g.size} ({where(first_nonfinite)})"
    if huge:
        plural = "" if huge == 1 else "s"
        return (
            f"{huge} value{plural} of {g.size} whose square overflows {work}, "
            f"|g| > {float(limit):.4g} ({where(first_huge)})"
        )
    return None


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


def _resolve() -> tuple[str, Callable[..., None]]:
    global _active
    if _active is None:
        _active = _choose()
    return _active


def prepare() -> Callable[..., None]:
    """Returns the active backend's `adam_leaf`, for a step about to write.

    The backend is chosen (reading the environment, which may raise) here, at the first step,
    before anything is written.
    """
    return _resolve()[1]


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
    return _resolve()[0]
