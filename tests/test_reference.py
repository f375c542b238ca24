"""adam_update and Adam.step against an independent reference computed to 50 significant digits.

The reference is the formula of the ``adam_update`` docstring written out once more, element by
element, in Python's :mod:`decimal` arithmetic. It starts from the exact values of the float inputs
(``Decimal(float)`` is exact) and rounds nothing but at the 50th digit, so it stands for the exact
result. It shares no code with the package: it reads the fields of the config and calls the
schedule, nothing else.

How close the package must be follows from how floating point rounds. Each of the dozen
operations of a step rounds once, by at most half a unit in the last place (ulp), so one step
may be off by a few ulp of the values it combines, and ``t`` steps by ``t`` times that at most,
since Adam does not amplify earlier errors over a few steps. The bound per step and quantity is
:data:`ULPS_PER_STEP` units of the dtype's epsilon, scaled by the size of what was combined:

* ``p``: the largest ``|p|`` so far plus ``lr``. The new ``p`` is ``p`` minus an update of about
  ``lr`` (Adam's step is scale-free: ``m_hat / sqrt(v_hat)`` is of order 1), each known to a few
  ulp, and an error made while ``|p|`` was larger stays when ``p`` crosses zero.
* ``m`` and ``v``: the same moving averages taken over ``|g| + wd * |p|`` instead of
  ``g + wd * p``. ``m`` averages gradients of both signs and L2 decay may cancel the gradient, so
  either may come out nearly 0 while its rounding errors stay those of its terms.
* ``v_max``: the largest such scale of ``v`` so far.

On top of that ``p`` may carry the error of the bias corrections ``1 - beta**t``, which the
documented formula (and the notebook) computes in float64: for beta2 = 0.999 and small ``t``
this subtraction magnifies the rounding of ``beta2**t`` some hundred times (see
:func:`constants`), a few times 1e-15 of the update in float64 and nothing visible in float32.

float16 parameters are computed in float32 and rounded to float16 after each step; their moments
are float32. The reference does the same: exact arithmetic on the stored values, then one rounding
of ``p`` to float16 and of ``m``, ``v`` and ``v_max`` to float32. A float32 result close to a float16 rounding boundary may round
the other way than the exact one, so one step may differ by one float16 ulp, and a trajectory,
which carries such differences forward, by :data:`FLOAT16_TRAJECTORY_ULPS` ulp of the scales
above.

The reference only ever sees some elements of the large arrays (the first and last, those on
either side of every multiple of ``BLOCK_SIZE``, and a random few): Adam is elementwise, so the
reference of an element depends on that element alone, and the block edges are where a blocked
kernel would go wrong. Every installed backend is checked.

The package folds the bias corrections into per-step scalars (one division and one square root per
element), which the reference does not: it divides ``m`` and ``v`` by them as the formula is
written. So the bound above, ULPS_PER_STEP = 8 units of epsilon per step times the scale, is what
separates the two, and the deliberate mistakes below land a thousand times beyond it. The seed
notebook's class, which also divides, is matched to rounding in float64: ``p`` within
NOTEBOOK_ULPS_PER_STEP = 4 ulps of ``|p| + lr`` per step, the moments bit for bit unless L2 decay
passes ``p``'s difference on to them. ``torch.optim.Adam``'s trajectories, over 300 float64 steps,
agree to 1e-12 relative.
"""

from __future__ import annotations

import decimal
import importlib.util
from decimal import Decimal
from typing import Any, NamedTuple

import numpy as np
import pytest

from adam_functional import (
    Adam,
    AdamConfig,
    adam_init,
    adam_update,
    backend,
    bench,
    kernels,
    schedules,
)
from adam_functional.kernels import numpy as reference
from adam_functional.kernels.numpy import BLOCK_SIZE

BACKENDS = {"numpy": reference.adam_leaf}
if importlib.util.find_spec("numba") is not None:
    from adam_functional.kernels import numba as _numba

    BACKENDS["numba"] = _numba.adam_leaf

PRECISION = 50
EPS64 = Decimal(float(np.finfo(np.float64).eps))
EPS32 = float(np.finfo(np.float32).eps)
EPS16 = float(np.finfo(np.float16).eps)
STEPS = 6
ULPS_PER_STEP = 8
FLOAT16_STEP_ULPS = 1
FLOAT16_TRAJECTORY_ULPS = 2
DTYPES = [np.float64, np.float32, np.float16]

# One tree holds every shape, so that one call updates them all: a 0-d array, an empty one, a
# small matrix, lengths on either side of one block, and a 2-d array crossing two block edges.
SHAPES = {
    "scalar": (),
    "empty": (0,),
    "matrix": (3, 5),
    "block_minus_1": (BLOCK_SIZE - 1,),
    "block": (BLOCK_SIZE,),
    "block_plus_1": (BLOCK_SIZE + 1,),
    "three_blocks": (2, BLOCK_SIZE + 3),
}
# The gradients' scale changes from step to step, so that v falls as well as rises (which is
# what AMSGrad's maximum is for) and m changes sign.
# One gradient scale per step (STEPS of them): large, small and tiny, so that m and v see both.
GRAD_SCALES = [1.0, 3.0, 0.01, 0.5, 0.02, 1.5]

# Keyword arguments of AdamConfig and Adam alike; lr=0.01 unless given.
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "betas_eps": {"beta1": 0.5, "beta2": 0.9, "eps": 1e-3},
    "zero_betas": {"beta1": 0.0, "beta2": 0.0},
    "l2": {"weight_decay": 0.05},
    "adamw": {"weight_decay": 0.05, "decoupled_weight_decay": True},
    "adamw_zero_decay": {"weight_decay": 0.0, "decoupled_weight_decay": True},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "maximize_l2": {"maximize": True, "weight_decay": 0.05},
    "l2_amsgrad_betas": {"weight_decay": 0.05, "amsgrad": True, "beta1": 0.8, "beta2": 0.99},
    "adamw_amsgrad_maximize": {
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
        "amsgrad": True,
        "maximize": True,
    },
    "warmup_cosine": {"lr": schedules.warmup_cosine_decay(0.05, 3, 8, end_value=0.001)},
    "cosine_adamw_amsgrad": {
        "lr": schedules.CosineDecay(0.05, 6, end_value=0.002),
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
        "amsgrad": True,
    },
    "callable_l2_maximize": {"lr": lambda t: 0.02 / t, "weight_decay": 0.01, "maximize": True},
    "nesterov": {"nesterov": True},
    "eps_root": {"eps_root": 1e-4, "eps": 0.0},
    "nesterov_eps_root_amsgrad_l2": {
        "nesterov": True,
        "eps_root": 1e-6,
        "amsgrad": True,
        "weight_decay": 0.05,
        "beta1": 0.8,
    },
}


def make_config(name: str) -> dict[str, Any]:
    return {"lr": 0.01, **CONFIGS[name]}


@pytest.fixture(params=list(BACKENDS))
def kernel(request):
    """Makes each backend in turn the one that adam_update and Adam.step use."""
    with kernels.use_backend(request.param):
        assert backend() == request.param
        yield request.param


# ---------------------------------------------------------------------------------------------------
# The reference.


def context() -> decimal.Context:
    # The default traps stay on: a division by zero or an invalid operation in the reference
    # raises instead of passing a NaN along.
    return decimal.Context(prec=PRECISION)


class Constants(NamedTuple):
    """The scalars of step ``t``, exactly: the config's floats converted without rounding."""

    lr: Decimal
    beta1: Decimal
    beta2: Decimal
    eps: Decimal
    weight_decay: Decimal
    bias_correction1: Decimal
    bias_correction2: Decimal
    correction_error: Decimal
    bias_correction1_next: Decimal  # 1 - beta1 ** (t + 1), for Nesterov's momentum.
    eps_root: Decimal


class Element(NamedTuple):
    """One element of the parameters and the state, and the scales of their rounding errors.

    The moments average the gradient after weight decay, ``g + wd * p``, whose two terms may
    cancel while their rounding errors stay those of the terms. ``m_size`` and ``v_size`` are
    the moments taken over ``|g| + wd * |p|`` instead, ``v_max_size`` the largest ``v_size`` so
    far and ``p_size`` the largest ``|p|``. ``p_slack`` is what the float64 bias corrections may
    have added to the error of ``p`` (see :func:`constants`).
    """

    p: Decimal
    m: Decimal
    v: Decimal
    v_max: Decimal | None
    m_size: Decimal
    v_size: Decimal
    v_max_size: Decimal
    p_size: Decimal
    p_slack: Decimal


# Deliberate mistakes, each one a formula that someone could plausibly have written instead.
# The reference computes them only to show that the comparison tells them from the right one.
MISTAKES = {
    "amsgrad_of_bias_corrected_v": {"amsgrad": True},
    "eps_inside_sqrt": {},
    "no_bias_correction": {},
    "maximize_after_l2": {"maximize": True, "weight_decay": 0.05},
    "decay_after_step": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "l2_as_well_when_decoupled": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "lr_of_previous_step": {"lr": schedules.warmup_cosine_decay(0.05, 3, 8, end_value=0.001)},
    "nesterov_as_plain_momentum": {"nesterov": True},
    "eps_root_outside_sqrt": {"eps_root": 1e-4, "eps": 0.0},
}


def constants(config: AdamConfig, t: int, mistake: str | None = None) -> Constants:
    """The scalars of step ``t`` (1-based), the learning rate being ``lr(t)``.

    ``correction_error`` bounds the relative error that the documented float64 bias corrections
    bring into the update, whatever the parameters' dtype. ``beta ** t`` in float64 is within
    one ulp, ``eps64 * beta**t``, and ``1 - beta**t`` turns that into a relative error of
    ``eps64 * beta**t / (1 - beta**t)``: 999 ulp for beta2 = 0.999 at the first step. ``m_hat``
    carries that of the first correction, ``sqrt(v_hat)`` half that of the second. Twice their
    sum is allowed.
    """
    with decimal.localcontext(context()):
        lr = config.lr
        if callable(lr):
            lr = lr(t - 1 if mistake == "lr_of_previous_step" else t)
        beta1, beta2 = Decimal(config.beta1), Decimal(config.beta2)
        one = Decimal(1)
        if mistake == "no_bias_correction":
            correction1 = correction2 = next1 = one
        else:
            correction1, correction2 = one - beta1**t, one - beta2**t
            next1 = one - beta1 ** (t + 1)
        amplification = (1 - correction1) / correction1 + (1 - correction2) / (2 * correction2)
        return Constants(
            lr=Decimal(lr),
            beta1=beta1,
            beta2=beta2,
            eps=Decimal(config.eps),
            weight_decay=Decimal(config.weight_decay),
            bias_correction1=correction1,
            bias_correction2=correction2,
            correction_error=2 * EPS64 * amplification,
            bias_correction1_next=next1,
            eps_root=Decimal(config.eps_root),
        )


def reference_step(
    x: Element, g: Decimal, c: Constants, config: AdamConfig, mistake: str | None = None
) -> Element:
    """One step of the documented formula on one element, at 50 digits."""
    with decimal.localcontext(context()):
        p, m, v, v_max, m_size, v_size, v_max_size, p_size, p_slack = x
        decoupled = config.decoupled_weight_decay
        l2 = c.weight_decay > 0 and (not decoupled or mistake == "l2_as_well_when_decoupled")
        size = abs(g) + (c.weight_decay * abs(p) if l2 else 0)
        if config.maximize and mistake != "maximize_after_l2":
            g = -g
        if l2:
            g = g + c.weight_decay * p
        if config.maximize and mistake == "maximize_after_l2":
            g = -g
        if decoupled and mistake != "decay_after_step":
            p = p * (1 - c.lr * c.weight_decay)
        m = c.beta1 * m + (1 - c.beta1) * g
        v = c.beta2 * v + (1 - c.beta2) * g * g
        m_size = c.beta1 * m_size + (1 - c.beta1) * size
        v_size = c.beta2 * v_size + (1 - c.beta2) * size * size
        v_max_size = max(v_max_size, v_size)
        if not config.amsgrad:
            v_hat = v / c.bias_correction2
        elif mistake == "amsgrad_of_bias_corrected_v":
            assert v_max is not None
            v_max = v_hat = max(v_max, v / c.bias_correction2)
        else:
            assert v_max is not None
            v_max = max(v_max, v)
            v_hat = v_max / c.bias_correction2
        if config.nesterov and mistake != "nesterov_as_plain_momentum":
            # optax.adam(nesterov=True): Dozat's momentum with both bias corrections.
            m_hat = c.beta1 * m / c.bias_correction1_next + (1 - c.beta1) * g / c.bias_correction1
        else:
            m_hat = m / c.bias_correction1
        if mistake == "eps_inside_sqrt":
            denominator = (v_hat + c.eps).sqrt()
        elif mistake == "eps_root_outside_sqrt":
            denominator = v_hat.sqrt() + c.eps_root + c.eps
        else:
            denominator = (v_hat + c.eps_root).sqrt() + c.eps
        update = c.lr * m_hat / denominator
        p = p - update
        if decoupled and mistake == "decay_after_step":
            p = p * (1 - c.lr * c.weight_decay)
        p_size = max(p_size, abs(p))
        p_slack = p_slack + abs(update) * c.correction_error
        return Element(p, m, v, v_max, m_size, v_size, v_max_size, p_size, p_slack)


def round_to(dtype: type[np.floating[Any]], x: Decimal) -> Decimal:
    """``x`` rounded to ``dtype``, as an exact Decimal again.

    For float16 this rounds twice, to float64 and then to float16; the two differ from one
    correct rounding only when the exact value lies within 2**-42 relative of a float16 tie.
    """
    return Decimal(float(dtype(float(x))))


def round_element(dtype: type[np.floating[Any]], x: Element) -> Element:
    """``x`` as stored: ``p`` in ``dtype``, the moments in the dtype the default config gives
    parameters of ``dtype`` (float32 for float16)."""
    moments = AdamConfig().moments_dtype(np.dtype(dtype)).type
    v_max = None if x.v_max is None else round_to(moments, x.v_max)
    m, v = (round_to(moments, value) for value in x[1:3])
    return x._replace(p=round_to(dtype, x.p), m=m, v=v, v_max=v_max)


def start(p: float, config: AdamConfig) -> Element:
    zero, exact = Decimal(0), Decimal(p)
    v_max = zero if config.amsgrad else None
    return Element(exact, zero, zero, v_max, zero, zero, zero, abs(exact), zero)


def reference_trajectory(
    p0: np.ndarray,
    grads: list[np.ndarray],
    config: AdamConfig,
    indices: list[int],
    mistake: str | None = None,
) -> list[list[Element]]:
    """The reference's state after each step, at the given flat indices of one leaf.

    float16 parameters are stored rounded to float16 after each step, and their moments to
    float32, as the package stores them; wider ones are left exact.
    """
    dtype = p0.dtype.type
    flat_p, flat_grads = p0.reshape(-1), [g.reshape(-1) for g in grads]
    xs = [start(float(flat_p[i]), config) for i in indices]
    steps = []
    for t, g in enumerate(flat_grads, start=1):
        c = constants(config, t, mistake)
        xs = [
            reference_step(x, Decimal(float(g[i])), c, config, mistake) for x, i in zip(xs, indices)
        ]
        if dtype is np.float16:
            xs = [round_element(dtype, x) for x in xs]
        steps.append(xs)
    return steps


# ---------------------------------------------------------------------------------------------------
# The package's results, and the comparison.


class Arrays(NamedTuple):
    """One leaf of the parameters and of the state after a step."""

    p: np.ndarray
    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray | None


def element_of(arrays: Arrays, index: int) -> Element:
    """Element ``index`` of the package's results, to start a reference step from."""
    p, m, v, v_max = (None if a is None else Decimal(float(a.reshape(-1)[index])) for a in arrays)
    assert p is not None and m is not None and v is not None
    return Element(p, m, v, v_max, abs(m), v, v if v_max is None else v_max, abs(p), Decimal(0))


def run_pure(params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], kwargs):
    config = AdamConfig(**kwargs)
    state = adam_init(params, config)
    steps = []
    for g in grads:
        params, state = adam_update(params, g, state, config)
        steps.append(
            {
                key: Arrays(
                    params[key],
                    state.m[key],
                    state.v[key],
                    None if state.v_max is None else state.v_max[key],
                )
                for key in params
            }
        )
    return steps


def run_wrapper(params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], kwargs):
    opt = Adam(**kwargs)
    params = {key: leaf.copy() for key, leaf in params.items()}
    steps = []
    for g in grads:
        opt.step(params, g)
        step = {}
        for key, leaf in params.items():
            state = opt.get_state(leaf)
            assert state.t == len(steps) + 1
            step[key] = Arrays(leaf.copy(), state.m, state.v, state.v_max)
        steps.append(step)
    return steps


def sample_indices(size: int, rng: np.random.Generator) -> list[int]:
    """All indices of a small leaf; of a large one, its ends, its block edges and a few more."""
    if size <= 48:
        return list(range(size))
    chosen = {*range(4), *range(size - 4, size)}
    for edge in range(BLOCK_SIZE, size, BLOCK_SIZE):
        chosen.update(range(edge - 3, min(edge + 3, size)))
    chosen.update(int(i) for i in rng.choice(size, 12, replace=False))
    return sorted(chosen)


class Problem(NamedTuple):
    params: dict[str, np.ndarray]
    grads: list[dict[str, np.ndarray]]
    indices: dict[str, list[int]]


def make_problem(dtype: type[np.floating[Any]], seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    params, indices = {}, {}
    for key, shape in SHAPES.items():
        p = rng.normal(0.0, 2.0, shape)
        p[rng.random(shape) < 0.05] = 0.0
        params[key] = np.asarray(p, dtype)
        indices[key] = sample_indices(params[key].size, rng)
    grads = []
    for scale in GRAD_SCALES:
        step = {}
        for key, shape in SHAPES.items():
            g = rng.normal(0.0, scale, shape)
            g[rng.random(shape) < 0.1] = 0.0  # A zero gradient: 0 / (0 + eps) at the first step.
            step[key] = np.asarray(g, dtype)
        grads.append(step)
    return Problem(params, grads, indices)


PROBLEMS = {dtype: make_problem(dtype) for dtype in DTYPES}
_TRAJECTORIES: dict[tuple[str, type[np.floating[Any]]], dict[str, list[dict[str, Any]]]] = {}


def columns(xs: list[Element]) -> dict[str, np.ndarray]:
    """The fields of one step's elements as float64 arrays, for vectorized comparisons.

    Rounding the exact values to float64 moves them by half a float64 ulp, far inside every
    tolerance below.
    """
    if not xs:
        return {}
    names = [name for name in Element._fields if not (name == "v_max" and xs[0].v_max is None)]
    return {name: np.array([float(getattr(x, name)) for x in xs]) for name in names}


def trajectories(name: str, dtype: type[np.floating[Any]]) -> dict[str, list[dict[str, Any]]]:
    """The reference for config ``name`` on the problem of ``dtype``, computed once."""
    if (name, dtype) not in _TRAJECTORIES:
        problem, config = PROBLEMS[dtype], AdamConfig(**make_config(name))
        _TRAJECTORIES[name, dtype] = {
            key: [
                columns(xs)
                for xs in reference_trajectory(
                    problem.params[key],
                    [g[key] for g in problem.grads],
                    config,
                    problem.indices[key],
                )
            ]
            for key in SHAPES
        }
    return _TRAJECTORIES[name, dtype]


def ulp16(x: np.ndarray) -> np.ndarray:
    """The spacing of float16 numbers at ``|x|`` (the smallest subnormal at 0)."""
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)


def largest_lr(config: AdamConfig, steps: int) -> float:
    return max(config.lr(t) if callable(config.lr) else config.lr for t in range(1, steps + 1))


def allowed_errors(
    dtype: type[np.floating[Any]],
    name: str,
    ref: dict[str, np.ndarray],
    value: np.ndarray,
    lr: float,
    steps: int,
) -> np.ndarray:
    """How far ``name`` may be from the reference ``ref`` after ``steps`` steps of the package.

    ``steps=0`` asks for a single step from the package's own state, for float16 one rounding
    of a float32 result: one float16 ulp, plus the float32 error.
    """
    sizes = {"p": ref["p_size"] + lr, "m": ref["m_size"], "v": ref["v_size"]}
    scale = sizes.get(name, ref["v_max_size"])
    slack = ref["p_slack"] if name == "p" else 0.0
    if dtype is not np.float16:
        return max(steps, 1) * ULPS_PER_STEP * float(np.finfo(dtype).eps) * scale + slack
    ulps = np.maximum(ulp16(ref[name]), ulp16(value))
    if steps == 0:
        return FLOAT16_STEP_ULPS * ulps + ULPS_PER_STEP * EPS32 * scale + slack
    return FLOAT16_TRAJECTORY_ULPS * np.maximum(ulps, EPS16 * scale) + slack


def mismatches(
    dtype: type[np.floating[Any]],
    ours: Arrays,
    ref: dict[str, np.ndarray],
    indices: list[int],
    lr: float,
    steps: int,
) -> list[tuple[float, str]]:
    """Each element further from the reference than :func:`allowed_errors`, worst first.

    The first item of each pair is the distance in units of the allowed distance, so a value
    above 1 fails.
    """
    found = []
    for name in ("p", "m", "v", "v_max"):
        got = getattr(ours, name)
        if got is None or not indices:
            assert got is None or not indices or name not in ref
            continue
        value = got.reshape(-1)[indices].astype(np.float64)
        exact = ref[name]
        allowed = allowed_errors(dtype, name, ref, value, lr, steps)
        error = np.abs(value - exact)
        for k in np.flatnonzero(~(error <= allowed)):  # NaN fails too.
            ratio = error[k] / allowed[k] if allowed[k] > 0 else float("inf")
            found.append(
                (
                    float(ratio),
                    f"{name}[{indices[k]}]: got {value[k]!r}, reference {exact[k]!r}, "
                    f"allowed {allowed[k]:.3g}",
                )
            )
    return sorted(found, reverse=True)


def assert_trajectory_matches(steps, name, dtype):
    """Asserts that the package's state after each step is the reference's, to the tolerance."""
    problem, reference = PROBLEMS[dtype], trajectories(name, dtype)
    lr = largest_lr(AdamConfig(**make_config(name)), STEPS)
    assert len(steps) == STEPS
    for t, step in enumerate(steps, start=1):
        assert list(step) == list(SHAPES)
        for key, ours in step.items():
            assert ours.p.dtype == dtype
            assert ours.p.shape == SHAPES[key]
            assert ours.m.dtype == ours.v.dtype == AdamConfig().moments_dtype(np.dtype(dtype))
            bad = mismatches(dtype, ours, reference[key][t - 1], problem.indices[key], lr, t)
            assert not bad, f"{key} after step {t}: {len(bad)} off, worst: {bad[:3]}"


# ---------------------------------------------------------------------------------------------------
# Hand-computed steps.

# lr=0.1 with the default betas and eps; params [1, -2, 0.5]; grads [0.5, -0.5, 0] then
# [0.5, 0, 0]. Step 1 of the plain config, for the first element: m = 0.1 * 0.5 = 0.05,
# v = 0.001 * 0.25 = 0.00025, m_hat = 0.05 / 0.1 = 0.5, v_hat = 0.00025 / 0.001 = 0.25, so
# p = 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 1 - 0.1 * (1 - 2e-8 + 4e-16 - ...) = 0.90000000199999996.
# Step 2: m = 0.095, v = 0.00049975, m_hat = 0.095 / 0.19 = 0.5 and v_hat = 0.00049975 / 0.001999
# = 0.25 again, so p falls by the same 0.0999999980000000399... to 0.80000000399999992.
# The second element's gradient drops to 0 at step 2: m = -0.045, v = 0.00024975 has fallen, so
# AMSGrad divides by sqrt(0.00025 / 0.001999) instead of sqrt(0.00024975 / 0.001999). A zero
# gradient throughout leaves the third element where it was: 0 / (0 + eps) = 0.
HAND_PARAMS = [1.0, -2.0, 0.5]
HAND_GRADS = [[0.5, -0.5, 0.0], [0.5, 0.0, 0.0]]
# Per config: the hyperparameters, then (p, m, v) after step 1 and after step 2, to 19 digits.
HAND_STEPS = {
    "plain": (
        {},
        (
            [0.9000000019999999600, -1.900000001999999960, 0.5],
            [0.05, -0.05, 0.0],
            [0.00025, 0.00025, 0.0],
        ),
        (
            [0.8000000039999999200, -1.832994178482030717, 0.5],
            [0.095, -0.045, 0.0],
            [0.00049975, 0.00024975, 0.0],
        ),
    ),
    # g + 0.1 * p: [0.6, -0.7, 0.05], then [0.5 + 0.09000000016666666, ...].
    "l2": (
        {"weight_decay": 0.1},
        (
            [0.9000000016666666389, -1.900000001428571408, 0.4000000199999960000],
            [0.06, -0.07, 0.005],
            [0.00036, 0.00049, 0.0000025],
        ),
        (
            [0.8000473404883308522, -1.815834361379971490, 0.3011874610171547957],
            [0.1130000000166666664, -0.08200000001428571408, 0.008500000199999960000],
            [0.0007077400001966666634, 0.0005256100000542857135, 0.000004097500159999972000],
        ),
    ),
    # p * (1 - 0.1 * 0.1) = 0.99 p before each step; the moments are those of "plain".
    "adamw": (
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        (
            [0.8900000019999999600, -1.880000001999999960, 0.495],
            [0.05, -0.05, 0.0],
            [0.00025, 0.00025, 0.0],
        ),
        (
            [0.7811000039799999204, -1.794194178462030717, 0.49005],
            [0.095, -0.045, 0.0],
            [0.00049975, 0.00024975, 0.0],
        ),
    ),
    "maximize": (
        {"maximize": True},
        (
            [1.099999998000000040, -2.099999998000000040, 0.5],
            [-0.05, 0.05, 0.0],
            [0.00025, 0.00025, 0.0],
        ),
        (
            [1.199999996000000080, -2.167005821517969283, 0.5],
            [-0.095, 0.045, 0.0],
            [0.00049975, 0.00024975, 0.0],
        ),
    ),
    "amsgrad": (
        {"amsgrad": True},
        (
            [0.9000000019999999600, -1.900000001999999960, 0.5],
            [0.05, -0.05, 0.0],
            [0.00025, 0.00025, 0.0],
        ),
        (
            [0.8000000039999999200, -1.833027689772760519, 0.5],
            [0.095, -0.045, 0.0],
            [0.00049975, 0.00024975, 0.0],
        ),
    ),
}
# The values above are for the decimal hyperparameters; the float 0.999 is a little less, and
# 1 - 0.999 in floats is 0.001 * (1 + 8.9e-16). That and a few roundings stay well below 1e-14.
HAND_RTOL = 1e-14


@pytest.mark.parametrize("name", list(HAND_STEPS))
def test_first_two_steps_are_the_hand_computed_values(name):
    kwargs, *expected = HAND_STEPS[name]
    config = AdamConfig(lr=0.1, **kwargs)
    params = np.array(HAND_PARAMS)
    state = adam_init(params, config)
    opt, in_place = Adam(lr=0.1, **kwargs), params.copy()
    for grads, (p, m, v) in zip(HAND_GRADS, expected):
        params, state = adam_update(params, np.array(grads), state, config)
        opt.step(in_place, np.array(grads))
        for got in (
            (params, state.m, state.v),
            (in_place, opt.get_state(in_place).m, opt.get_state(in_place).v),
        ):
            np.testing.assert_allclose(got[0], p, rtol=HAND_RTOL, atol=0)
            np.testing.assert_allclose(got[1], m, rtol=HAND_RTOL, atol=0)
            np.testing.assert_allclose(got[2], v, rtol=HAND_RTOL, atol=0)


@pytest.mark.parametrize("name", list(HAND_STEPS))
def test_reference_gives_the_hand_computed_values(name):
    kwargs, *expected = HAND_STEPS[name]
    config = AdamConfig(lr=0.1, **kwargs)
    steps = reference_trajectory(
        np.array(HAND_PARAMS), [np.array(g) for g in HAND_GRADS], config, [0, 1, 2]
    )
    for xs, (p, m, v) in zip(steps, expected):
        np.testing.assert_allclose([float(x.p) for x in xs], p, rtol=HAND_RTOL, atol=0)
        np.testing.assert_allclose([float(x.m) for x in xs], m, rtol=HAND_RTOL, atol=0)
        np.testing.assert_allclose([float(x.v) for x in xs], v, rtol=HAND_RTOL, atol=0)


# ---------------------------------------------------------------------------------------------------
# Ten steps of every configuration against the reference.


# The quick tests take a few configs that together use every option; the slow ones take all.
QUICK_CONFIGS = {
    "plain",
    "l2_amsgrad_betas",
    "adamw_amsgrad_maximize",
    "nesterov_eps_root_amsgrad_l2",
}
SOME_CONFIGS = [
    name if name in QUICK_CONFIGS else pytest.param(name, marks=pytest.mark.slow)
    for name in CONFIGS
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", SOME_CONFIGS)
def test_pure_update_follows_the_reference(name, dtype, kernel):
    problem = PROBLEMS[dtype]
    assert_trajectory_matches(
        run_pure(problem.params, problem.grads, make_config(name)), name, dtype
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_wrapper_follows_the_reference(name, dtype, kernel):
    problem = PROBLEMS[dtype]
    steps = run_wrapper(problem.params, problem.grads, make_config(name))
    assert_trajectory_matches(steps, name, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_step_is_the_reference_step_from_the_same_state(name, dtype, kernel):
    # The trajectories above let differences carry over from step to step. Here every step of
    # the package starts from the package's own previous state, and must land within one step's
    # tolerance (for float16: within one ulp of the exact step rounded to float16).
    problem, kwargs = PROBLEMS[dtype], make_config(name)
    config = AdamConfig(**kwargs)
    lr = largest_lr(config, STEPS)
    steps = run_pure(problem.params, problem.grads, kwargs)
    for key in ("matrix", "block_plus_1", "three_blocks"):
        indices = problem.indices[key]
        before = [start(float(problem.params[key].reshape(-1)[i]), config) for i in indices]
        for t, step in enumerate(steps, start=1):
            c = constants(config, t)
            g = problem.grads[t - 1][key].reshape(-1)
            exact = [
                reference_step(x, Decimal(float(g[i])), c, config) for x, i in zip(before, indices)
            ]
            if dtype is np.float16:
                exact = [round_element(dtype, x) for x in exact]
            ours = step[key]
            bad = mismatches(dtype, ours, columns(exact), indices, lr, 0)
            assert not bad, f"{key} at step {t}: {len(bad)} off, worst: {bad[:3]}"
            before = [element_of(ours, i) for i in indices]


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_comparison_tells_a_wrong_formula_from_the_right_one(mistake):
    # Each mistake changes the result by far more than the tolerance, so the comparison above
    # would catch the package making it.
    kwargs = {"lr": 0.01, **MISTAKES[mistake]}
    config = AdamConfig(**kwargs)
    problem = PROBLEMS[np.float64]
    params = {"matrix": problem.params["matrix"]}
    grads = [{"matrix": g["matrix"]} for g in problem.grads]
    steps = run_pure(params, grads, kwargs)
    indices = problem.indices["matrix"]
    lr = largest_lr(config, STEPS)
    p0, gs = params["matrix"], [g["matrix"] for g in grads]
    right = reference_trajectory(p0, gs, config, indices)
    wrong = reference_trajectory(p0, gs, config, indices, mistake)
    last = steps[-1]["matrix"]
    assert not mismatches(np.float64, last, columns(right[-1]), indices, lr, STEPS)
    worst = mismatches(np.float64, last, columns(wrong[-1]), indices, lr, STEPS)
    assert worst, f"{mistake}: the wrong formula passes"
    assert worst[0][0] > 1000, f"{mistake}: the wrong formula is within 1000x the tolerance"


# ---------------------------------------------------------------------------------------------------
# The notebook's class in float64, to rounding.


# The seed notebook's class, as the benchmark vendors it: its code verbatim.
NotebookAdam = bench.NotebookAdam


NOTEBOOK_CONFIGS = {
    "defaults": {},
    "notebook_weight_decay": {"lr": 0.01, "weight_decay": 0.01},
    "betas_eps_weight_decay": {
        "lr": 0.05,
        "beta1": 0.5,
        "beta2": 0.9,
        "eps": 1e-3,
        "weight_decay": 0.2,
    },
}
# The package folds the bias corrections into its scalars, where the notebook divides each
# element by them: the two round differently, each step by a few ulps of the update, and a
# trajectory adds the steps' differences up. Per step, NOTEBOOK_ULPS_PER_STEP float64 ulps of
# the scale below.
NOTEBOOK_ULPS_PER_STEP = 4


class Leaf(NamedTuple):
    """One parameter and its moments after a step."""

    p: np.ndarray
    m: np.ndarray
    v: np.ndarray


def assert_close_to_notebook(
    ours: Any,
    theirs: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    lr: float,
    wd: float,
    what: str,
) -> None:
    """``ours`` (p, m, v) within ``t`` steps' rounding of the notebook's ``theirs``, ``m``, ``v``.

    The scale of ``p`` is ``|p| + lr``: the update is of order ``lr`` and known to a few ulp, and
    the subtraction ``p - update`` rounds at ``p``'s ulp. Without weight decay the moments do not
    depend on ``p`` and are the notebook's bit for bit; L2 decay (``wd``) passes the difference
    in ``p`` on to them, scaled by ``wd`` (and for ``v`` by twice the gradient).
    """
    eps = float(EPS64)
    p_scale = np.abs(theirs) + lr
    bound = NOTEBOOK_ULPS_PER_STEP * t * eps
    m_scale = np.abs(m) + wd * p_scale
    v_scale = np.abs(v) + 2 * wd * p_scale * np.sqrt(np.abs(v) / (1 - 0.999))
    for name, a, b, scale in (
        ("p", ours.p, theirs, p_scale),
        ("m", ours.m, m, m_scale),
        ("v", ours.v, v, v_scale),
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name}"
        if wd == 0.0 and name != "p":
            assert a.tobytes() == b.tobytes(), f"{what}: {name} differs"
            continue
        off = np.abs(a - b) > bound * scale
        assert not off.any(), f"{what}: {name} beyond the bound at {np.flatnonzero(off)[:5]}"


@pytest.mark.parametrize("name", list(NOTEBOOK_CONFIGS))
def test_float64_agrees_with_the_notebook_to_rounding(name, kernel):
    kwargs = NOTEBOOK_CONFIGS[name]
    lr, wd = kwargs.get("lr", 0.001), kwargs.get("weight_decay", 0.0)
    problem = PROBLEMS[np.float64]
    keys = [key for key in SHAPES if SHAPES[key] != ()]  # The notebook's params[:] needs ndim >= 1.
    params = {key: problem.params[key] for key in keys}
    grads = [{key: g[key] for key in keys} for g in problem.grads]
    notebook, theirs = NotebookAdam(**kwargs), {key: leaf.copy() for key, leaf in params.items()}
    for t, (step, wrapped) in enumerate(
        zip(run_pure(params, grads, kwargs), run_wrapper(params, grads, kwargs)), start=1
    ):
        for key in keys:
            notebook.step(theirs[key], grads[t - 1][key])
            m, v = notebook.m[id(theirs[key])], notebook.v[id(theirs[key])]
            for how, ours in (("adam_update", step[key]), ("Adam.step", wrapped[key])):
                assert_close_to_notebook(
                    ours, theirs[key], m, v, t, lr, wd, f"{how}, {key}, step {t}"
                )


def test_float64_agrees_with_the_notebook_when_hyperparameters_change(kernel):
    # The notebook's hyperparameters are plain attributes that later steps read; the wrapper's
    # are assignable in the same way.
    problem = PROBLEMS[np.float64]
    p = problem.params["block_plus_1"]
    grads = [g["block_plus_1"] for g in problem.grads]
    ours, theirs = p.copy(), p.copy()
    opt, notebook = Adam(lr=0.01), NotebookAdam(lr=0.01)
    changes = {3: {"lr": 0.003}, 5: {"weight_decay": 0.02}, 7: {"beta1": 0.8, "eps": 1e-6}}
    wd = 0.0
    for t, g in enumerate(grads, start=1):
        for field, value in changes.get(t, {}).items():
            setattr(opt, field, value)
            setattr(notebook, field, value)
        wd = notebook.weight_decay
        opt.step(ours, g)
        notebook.step(theirs, g)
        state = Leaf(ours, opt.m[id(ours)], opt.v[id(ours)])
        m, v = notebook.m[id(theirs)], notebook.v[id(theirs)]
        # The largest lr so far sets the scale of what the earlier steps left behind.
        assert_close_to_notebook(state, theirs, m, v, t, 0.01, wd, f"step {t}")


# ---------------------------------------------------------------------------------------------------
# Trajectories of torch.optim.Adam, in float64.

TORCH_STEPS = 300
# Keyword arguments of AdamConfig and of torch.optim.Adam (AdamW for decoupled decay).
TORCH_CONFIGS = {
    "defaults": ({}, {}),
    "l2": ({"weight_decay": 0.05}, {"weight_decay": 0.05}),
    "adamw": ({"weight_decay": 0.05, "decoupled_weight_decay": True}, {"weight_decay": 0.05}),
    "amsgrad_maximize": ({"amsgrad": True, "maximize": True}, {"amsgrad": True, "maximize": True}),
    "betas_eps": (
        {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
        {"betas": (0.8, 0.99), "eps": 1e-6},
    ),
}


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_trajectory_agrees_with_torch(name, kernel):
    # torch folds the bias corrections in another order (docs/algorithm.md): the two agree to
    # rounding, which over 300 steps stays within 1e-12 of the parameters.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    ours_kwargs, theirs_kwargs = TORCH_CONFIGS[name]
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal((8, 16))
    grads = [rng.standard_normal(p0.shape) * rng.uniform(0.01, 3.0) for _ in range(TORCH_STEPS)]
    config = AdamConfig(lr=0.01, **ours_kwargs)
    params, state = p0, adam_init(p0, config)
    decoupled = ours_kwargs.get("decoupled_weight_decay", False)
    weights = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    optimizer = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        [weights], lr=0.01, **({"weight_decay": 0.0} if decoupled else {}) | theirs_kwargs
    )
    for g in grads:
        params, state = adam_update(params, g, state, config)
        weights.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    np.testing.assert_allclose(params, weights.detach().numpy(), rtol=1e-12, atol=0)
