"""The reference kernel: one Adam step on one array with NumPy, in cache-sized blocks.

This is the formula of ``docs/algorithm.md`` in code; every other backend is held to its results
bit for bit. `adam_leaf` walks the data in blocks of `BLOCK_SIZE` elements, so that its temporaries
stay in cache and no full-size temporary is ever made; the temporaries are kept between steps,
per thread (`kernels.scratch`). Arrays of a few float64 elements are computed in Python floats
instead (`scalar`, and `small_step`, which checks as it computes), with the same operations in
the same order, and so the same bits.

The per-step scalars are folded once (`fold`), so that an element costs one division and one
square root, where the notebook's order takes three divisions; the results agree with the
notebook's class to rounding, a few ulps of the update. float16 is computed in float32 (see
`work_dtype`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from adam_functional.kernels import (
    Coefficients,
    Inputs,
    Outputs,
    SmallArrays,
    SmallScalars,
    bias_corrections,
    flat,
    scratch,
    work_dtype,
    write_back,
)

__all__ = [
    "BLOCK_SIZE",
    "CHECK_CHUNK",
    "SCALAR_SIZE",
    "adam_leaf",
    "fold",
    "fold_plain",
    "is_plain",
    "plain_moments",
    "plain_params",
    "scalar",
    "scalar_fits",
    "small_scalars",
    "small_step",
    "squares_fit",
    "supports",
]

#: Elements per block. A block makes a dozen NumPy calls of about a microsecond each, whatever
#: its length; at 32768 elements that overhead is small next to the arithmetic, and the block's
#: seven operands and two to four temporaries (2 to 3 MiB of float64) stay in cache. Measured at
#: 4e6 float64 elements, in place, 8192 took 1.25 times as long; the temporaries, 256 KiB each in
#: float64, kept from step to step, are all the memory a step uses beyond its outputs.
BLOCK_SIZE = 32768


#: float64 arrays of at most this many elements are computed element by element in Python
#: floats (`scalar`), whose operations round exactly as NumPy's float64 ones: at this size one
#: NumPy call costs more than the arithmetic of all the elements, and a step makes a dozen.
SCALAR_SIZE = 16

_FLOAT64 = np.dtype(np.float64)
#: Elements per sum of squares in `squares_fit`: short enough that a BLAS library starts no
#: threads for it, long enough that the per-call cost is small.
CHECK_CHUNK = 1 << 13
_LARGEST: dict[np.dtype, float] = {}
# The NaNs that NumPy's (and so the hardware's) 0.0 / 0.0 and square root of a negative number
# make, with their sign bit (set on x86): where Python raises, `_every_option` writes these, so
# that its NaNs have the bits of the arrays' kernels.
with np.errstate(invalid="ignore"):
    _ZERO_BY_ZERO = float(np.divide(np.zeros(1), np.zeros(1))[0])
    _ROOT_OF_NEGATIVE = float(np.sqrt(-np.ones(1))[0])


def supports(p: np.dtype, g: np.dtype, moments: np.dtype, total: int) -> bool:
    """Every floating-point parameter and moment dtype, and every real gradient dtype."""
    return True


def adam_leaf(x: Inputs, c: Coefficients, out: Outputs) -> None:
    """Computes one Adam step for one array, writing the results into ``out``.

    See `Kernel` for what the arrays may be. The operations are those of ``docs/algorithm.md``, in
    its order; `_block` spells them out.
    """
    if x.p.size <= SCALAR_SIZE and scalar_fits(x, out):
        scalar(x, c, out)
        return
    # The checks have run: whatever the arithmetic meets now (an underflow, or the NaN it was
    # asked to propagate) must not interrupt the step half-way, warning or not.
    with np.errstate(all="ignore"):
        _arrays(x, c, out)


def _arrays(x: Inputs, c: Coefficients, out: Outputs) -> None:
    work = work_dtype(x.p.dtype, x.m.dtype)
    transform_g = x.g.dtype != work or c.maximize or c.l2 != 0.0
    if x.p.size <= BLOCK_SIZE and x.p.dtype == work and x.m.dtype == work:
        # One block: ufuncs take the arrays as they are, whatever their layout, no reshaping.
        _block(x, c, fold(c), out, Scratch.make(x.p.shape, work, transform_g, c))
        return
    flat_x, flat_out = flat(x, out)
    _blocks(flat_x, c, flat_out, work, transform_g)
    write_back(out, flat_out)


class Scratch(NamedTuple):
    """Temporaries of one block in the work dtype: ``gw`` holds a gradient that is transformed,
    ``t3`` the second term of Nesterov's momentum."""

    t1: np.ndarray
    t2: np.ndarray
    gw: np.ndarray | None
    t3: np.ndarray | None

    @classmethod
    def make(cls, shape: Any, work: np.dtype, transform_g: bool, c: Coefficients) -> Scratch:
        def empty(name: str, wanted: bool = True) -> np.ndarray | None:
            return scratch(name, shape, work) if wanted else None

        nesterov = c.bias_correction1_next is not None
        return cls(empty("t1"), empty("t2"), empty("gw", transform_g), empty("t3", nesterov))  # type: ignore[arg-type]

    def head(self, k: int) -> Scratch:
        return Scratch._make(None if a is None else a[:k] for a in self)


def _blocks(x: Inputs, c: Coefficients, out: Outputs, work: np.dtype, transform_g: bool) -> None:
    # Flat arrays, in blocks of BLOCK_SIZE elements: every temporary stays in cache. (Splitting
    # the blocks over threads was measured slower: the GIL between NumPy calls serializes them.)
    end = x.p.shape[0]
    size = min(end, BLOCK_SIZE)
    scratch = Scratch.make(size, work, transform_g, c)
    folded = fold(c)
    if x.p.dtype == work and x.m.dtype == work:
        # The common case, with as little Python per block as can be.
        p, g, m, v, v_max = x
        out_p, out_m, out_v, out_v_max = out
        for a in range(0, end, BLOCK_SIZE):
            b = a + BLOCK_SIZE
            _block(
                Inputs(p[a:b], g[a:b], m[a:b], v[a:b], None if v_max is None else v_max[a:b]),
                c,
                folded,
                Outputs(
                    out_p[a:b],
                    out_m[a:b],
                    out_v[a:b],
                    None if out_v_max is None else out_v_max[a:b],
                ),
                scratch if b <= end else scratch.head(end - a),
            )
        return
    # Arrays stored in another dtype than the work dtype (float16 parameters, float32 moments of
    # float64 parameters, ...) are loaded into these, computed in place there and stored back.
    stage_p = np.empty(size, work) if x.p.dtype != work else None
    stage_moments = None
    if x.m.dtype != work:
        stage_moments = [np.empty(size, work) for _ in range(3 if x.v_max is not None else 2)]
    for start in range(0, end, BLOCK_SIZE):
        part = slice(start, min(start + BLOCK_SIZE, end))
        block_x = Inputs._make(None if a is None else a[part] for a in x)
        block_out = Outputs._make(None if a is None else a[part] for a in out)
        k = block_x.p.shape[0]
        p_in, p_out = block_x.p, block_out.p
        if stage_p is not None:
            p_in = p_out = stage_p[:k]
            np.copyto(p_in, block_x.p)
        moments_in = [block_x.m, block_x.v, block_x.v_max]
        moments_out = [block_out.m, block_out.v, block_out.v_max]
        if stage_moments is not None:
            for i, stage in enumerate(stage_moments):
                np.copyto(stage[:k], moments_in[i])  # type: ignore[arg-type]
                moments_in[i] = moments_out[i] = stage[:k]
        _block(
            Inputs(p_in, block_x.g, *moments_in),  # type: ignore[arg-type]
            c,
            folded,
            Outputs(p_out, *moments_out),  # type: ignore[arg-type]
            scratch.head(k),
        )
        if stage_p is not None:
            np.copyto(block_out.p, p_out, casting="same_kind")
        if stage_moments is not None:
            for target, result in zip(block_out[1:], stage_moments):
                np.copyto(target, result[:k], casting="same_kind")  # type: ignore[arg-type]


def _block(
    x: Inputs, c: Coefficients, folded: tuple[Any, Any, Any, Any], out: Outputs, scratch: Scratch
) -> None:
    p, g, m, v, v_max = x
    out_p, out_m, out_v, out_v_max = out
    t1, t2, gw, t3 = scratch
    step_m, step_g, eps, eps_root = folded
    # One block, all operands of one shape and of the work dtype except g. Each line is one
    # operation of ``docs/algorithm.md``, in its order; the compiled backend repeats them.
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
    np.multiply(out_m, step_m, out=t1)
    if step_g is not None and t3 is not None:
        np.multiply(g, step_g, out=t3)
        np.add(t1, t3, out=t1)
    if eps_root != 0.0:
        np.add(second, eps_root, out=t2)
        second = t2
    np.sqrt(second, out=t2)
    np.add(t2, eps, out=t2)
    np.divide(t1, t2, out=t1)
    np.subtract(p, t1, out=out_p)


def fold(c: Any) -> tuple[Any, Any, Any, Any]:
    """The step's scalars, folded once per step: ``(step_m, step_g, eps, eps_root)``.

    The bias-corrected update ``lr * (m / bc1) / (sqrt(v / bc2 + eps_root) + eps)`` is, with
    ``s = sqrt(bc2)`` multiplied through, ``(lr * s / bc1) * m / (sqrt(v + eps_root * bc2) +
    eps * s)``: the same number in exact arithmetic, with one division and one square root per
    element where the notebook's order takes three divisions. So ``step_m = lr * s / bc1``,
    ``eps = eps * s`` and ``eps_root = eps_root * bc2``. With Nesterov's momentum
    ``step_m = lr * beta1 * s / bc1_next`` and ``step_g = lr * (1 - beta1) * s / bc1``, the
    factor of ``g``; else ``step_g`` is None. The scalars are Python floats (float64), or 0-d
    arrays of the work dtype under ``jax.jit``; the arithmetic is the same.
    """
    eps_root = c.eps_root * c.bias_correction2
    if c.bias_correction1_next is None:
        step_m, eps = fold_plain(c.lr, c.bias_correction1, c.bias_correction2, c.eps)
        return step_m, None, eps, eps_root
    root_bc2 = c.bias_correction2**0.5
    step_m = c.lr * c.beta1 * root_bc2 / c.bias_correction1_next
    step_g = c.lr * c.one_minus_beta1 * root_bc2 / c.bias_correction1
    return step_m, step_g, c.eps * root_bc2, eps_root


def fold_plain(lr: Any, bias_correction1: Any, bias_correction2: Any, eps: Any) -> tuple[Any, Any]:
    """`fold`'s ``(step_m, eps)`` without Nesterov's momentum, from the step's scalars."""
    root_bc2 = bias_correction2**0.5
    return lr * root_bc2 / bias_correction1, eps * root_bc2


def scalar_fits(x: Inputs, out: Outputs) -> bool:
    """Whether `scalar` computes this step: every array float64, as Python floats are (the
    moments and the outputs have the dtype of ``m`` or ``p``)."""
    return x.p.dtype == _FLOAT64 and x.g.dtype == _FLOAT64 and x.m.dtype == _FLOAT64


def scalar(x: Inputs, c: Coefficients, out: Outputs) -> None:
    """`adam_leaf` for a few float64 elements, in Python floats: the operations of `_block` in
    its order, each rounded as NumPy rounds it, so the results are the same bit for bit.

    Python raises where NumPy gives inf or NaN (a division by zero, the square root of a
    negative number). A step with no option but L2 (`is_plain`) takes short loops that cannot
    meet either but by raising, and then the full loop, which spells those cases out, takes the
    step again.
    """
    ps, gs, ms, vs = (
        x.p.ravel().tolist(),
        x.g.ravel().tolist(),
        x.m.ravel().tolist(),
        x.v.ravel().tolist(),
    )
    step_m, step_g, eps, eps_root = fold(c)
    results: tuple[list[float], list[float], list[float], list[float] | None] | None = None
    if is_plain(c):
        new_m, new_v = plain_moments(ps, gs, ms, vs, *c[1:5], c.l2)
        try:
            results = plain_params(ps, new_m, new_v, step_m, eps), new_m, new_v, None
        except (ZeroDivisionError, ValueError):
            results = None
    if results is None:
        results = _every_option(ps, gs, ms, vs, x.v_max, c, step_m, step_g, eps, eps_root)
    new_p, new_m, new_v, new_v_max = results
    _store(out.p, new_p)
    _store(out.m, new_m)
    _store(out.v, new_v)
    if out.v_max is not None and new_v_max is not None:
        _store(out.v_max, new_v_max)


def _store(a: np.ndarray, values: list[float]) -> None:
    if a.flags.c_contiguous:
        a.ravel()[:] = values  # A view: quicker than `flat`.
    else:
        a.flat[:] = values


def plain_moments(
    ps: list[float],
    gs: list[float],
    ms: list[float],
    vs: list[float],
    beta1: float,
    one_minus_beta1: float,
    beta2: float,
    one_minus_beta2: float,
    l2: float,
) -> tuple[list[float], list[float]]:
    """The new moments of a step whose only option may be L2 weight decay (`is_plain`), in
    Python floats, in `scalar`'s order."""
    if l2 != 0.0:
        gs = [g + p * l2 for p, g in zip(ps, gs)]
    new_m = [m * beta1 + g * one_minus_beta1 for g, m in zip(gs, ms)]
    new_v = [v * beta2 + (g * g) * one_minus_beta2 for g, v in zip(gs, vs)]
    return new_m, new_v


def plain_params(
    ps: list[float], new_m: list[float], new_v: list[float], step_m: float, eps: float
) -> list[float]:
    """The new parameters of a step of `is_plain` from its new moments and the folded scalars,
    in Python floats, in `scalar`'s order. Raises ``ZeroDivisionError`` or ``ValueError`` where
    NumPy would give inf or NaN (``eps = 0`` with ``v = 0``, or a negative ``v``)."""
    sqrt = math.sqrt
    return [p - (m * step_m) / (sqrt(v) + eps) for p, m, v in zip(ps, new_m, new_v)]


def small_step(arrays: SmallArrays, scalars: SmallScalars) -> bool:
    """`kernels.small_step` in Python floats: `plain_moments`, the check that every new ``v``
    is finite, then `plain_params`. Python floats are float64: False for float32 arrays."""
    p, g, m, v, out_p, out_m, out_v = arrays
    if p.dtype != _FLOAT64:
        return False
    step_m, eps = scalars[5:]
    flat_p, flat_m, flat_v = p.ravel(), m.ravel(), v.ravel()  # views, but for p of another layout
    ps = flat_p.tolist()
    new_m, new_v = plain_moments(
        ps, g.ravel().tolist(), flat_m.tolist(), flat_v.tolist(), *scalars[:5]
    )
    if not math.isfinite(sum(new_v)):  # Also when a sum of finite values overflows.
        return False
    try:
        new_p = plain_params(ps, new_m, new_v, step_m, eps)
    except (ZeroDivisionError, ValueError):  # Not finite; the general kernel spells it out.
        return False
    (flat_p if out_p is p else out_p.ravel())[...] = new_p
    (flat_m if out_m is m else out_m.ravel())[...] = new_m
    (flat_v if out_v is v else out_v.ravel())[...] = new_v
    return True


def is_plain(c: Coefficients) -> bool:
    """Whether step ``c`` takes no option but L2 weight decay: the arithmetic of
    `plain_moments` and `plain_params`."""
    return (
        c.bias_correction1_next is None
        and c.eps_root == 0.0
        and c.decay is None
        and not (c.maximize or c.amsgrad)
    )


def _every_option(
    ps: list[float],
    gs: list[float],
    ms: list[float],
    vs: list[float],
    v_max: np.ndarray | None,
    c: Coefficients,
    step_m: float,
    step_g: float | None,
    eps: float,
    eps_root: float,
) -> tuple[list[float], list[float], list[float], list[float] | None]:
    beta1, one_minus_beta1 = c.beta1, c.one_minus_beta1
    beta2, one_minus_beta2 = c.beta2, c.one_minus_beta2
    l2, decay, maximize, amsgrad = c.l2, c.decay, c.maximize, c.amsgrad
    v_maxes = v_max.ravel().tolist() if amsgrad and v_max is not None else None
    new_p, new_m, new_v, new_v_max = [], [], [], []
    sqrt = math.sqrt
    for i, g in enumerate(gs):
        p = ps[i]
        if maximize:
            g = -g
        if l2 != 0.0:
            g = g + p * l2
        if decay is not None:
            p = p * decay
        m = ms[i] * beta1 + g * one_minus_beta1
        v = vs[i] * beta2 + (g * g) * one_minus_beta2
        second = v
        if v_maxes is not None:
            # np.maximum(v_max, v): NaN wins on either side, and a tie (+0.0 and -0.0) gives v.
            second = v_maxes[i]
            if not (second > v or second != second):
                second = v
            new_v_max.append(second)
        step = m * step_m
        if step_g is not None:
            step = step + g * step_g
        if eps_root != 0.0:
            second = second + eps_root
        denominator = (sqrt(second) if second >= 0.0 else _root_nan(second)) + eps
        if denominator != 0.0:
            step = step / denominator
        elif step == 0.0:
            step = _ZERO_BY_ZERO
        elif step == step:
            step = math.copysign(math.inf, step) * math.copysign(1.0, denominator)
        # else NaN / 0.0 is that NaN.
        new_p.append(p - step)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v, new_v_max


def _root_nan(x: float) -> float:
    """``np.sqrt(x)`` for an ``x`` that is NaN (that NaN) or negative."""
    return x if x != x else _ROOT_OF_NEGATIVE


def squares_fit(g: np.ndarray, work: np.dtype) -> bool:
    """`kernels.squares_fit`: a sum of squares, ``np.vdot`` over chunks of `CHECK_CHUNK`
    elements (no allocation, one read, no floating-point flags), is at most the largest value of
    ``work`` exactly when every square is, but for sums too large themselves."""
    if g.dtype.kind != "f":
        # Integers are finite, and the square of any int64 fits float32; only uint64 can reach
        # float32's limit, and integer sums would wrap around, so it is looked at value by value.
        return g.dtype != np.uint64
    largest = _LARGEST.get(work)
    if largest is None:
        largest = _LARGEST[work] = float(min(np.finfo(work).max, np.finfo(np.float64).max))
    if g.size <= CHECK_CHUNK:
        return float(np.vdot(g, g)) <= largest  # False for NaN.
    flat = g.reshape(-1)
    chunks = (flat[i : i + CHECK_CHUNK] for i in range(0, flat.shape[0], CHECK_CHUNK))
    return all(float(np.vdot(chunk, chunk)) <= largest for chunk in chunks)


def small_scalars(constants: tuple[float, ...], t: int) -> SmallScalars:
    """The scalars `small_step` takes at step ``t``, from a config's `kernels.constants`:
    ``(beta1, 1 - beta1, beta2, 1 - beta2, l2, step_m, eps)`` folded as `fold` folds them."""
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, l2, eps = constants
    bias_correction1, bias_correction2 = bias_corrections(beta1, beta2, t)
    step_m, eps = fold_plain(lr, bias_correction1, bias_correction2, eps)
    return (beta1, one_minus_beta1, beta2, one_minus_beta2, l2, step_m, eps)
