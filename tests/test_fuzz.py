"""Hostile inputs for adam_update and Adam.step: the right answer or a clean refusal, nothing else.

Hypothesis draws parameters, gradients, states and configs across dtypes (every float width,
ints, bool, complex, object, strings), shapes (0-d, empty, rank up to 6), values (NaN, infinities,
-0.0, subnormals, values near the float maximum), memory layouts (Fortran order, strided and
reversed views, read-only arrays, gradients that are the parameters themselves), Python scalars
and lists where arrays belong, and trees with missing, extra or reordered keys. Every call must:

- return exactly what the formula gives on contiguous copies in the work dtype (`_reference`,
  written here from the documented formula), with no shape ever broadcast; or
- raise ValueError, TypeError or FloatingPointError whose message starts with the argument it
  blames (``params``, ``grads``, ``state``, ``config``), and leave every input, and the wrapper's
  state, exactly as they were.

A case the generator knows to be invalid must raise; a valid one with finite gradients must
succeed; non-finite gradients must follow the config's policy. The cases these properties have
found, and the errors one by one, are pinned in ``test_bad_input.py``.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
from _util import snapshot, wrapper_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adam_functional import Adam, AdamConfig, AdamState, adam_update, schedules

# When a property fails, Hypothesis imports libcst to suggest a patch, and libcst's import warns
# (a DeprecationWarning from mypy_extensions), which this suite's warnings-as-errors turns into
# a pytest INTERNALERROR that hides the failure. Imported here first, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import libcst  # noqa: F401

NT1 = namedtuple("NT1", ["a"])
NT2 = namedtuple("NT2", ["a", "b"])
NT3 = namedtuple("NT3", ["a", "b", "c"])

PARAM_DTYPES = [np.float16, np.float32, np.float64, np.longdouble, np.dtype(">f8")]
BAD_PARAM_DTYPES = [np.int32, np.bool_, np.complex128, object, np.dtype("<U3")]
GRAD_DTYPES = [*PARAM_DTYPES, np.int8, np.int64, np.uint8, np.uint64, np.dtype(">f4")]
BAD_GRAD_DTYPES = [np.bool_, np.complex64, object, np.dtype("<U3"), np.dtype("M8[s]")]
SPECIALS = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    math.nan,
    math.inf,
    -math.inf,
    5e-324,  # float64's smallest subnormal
    2.2250738585072014e-308,
    1e-40,  # a float32 subnormal
    6e-8,  # a float16 subnormal
    65504.0,  # float16's maximum
    3.4028234663852886e38,  # float32's maximum
    1.7976931348623157e308,  # float64's maximum
    1.4e154,  # its square overflows float64
    1e200,
    1e20,  # its square overflows float32
    -1e-300,
]
ERRORS = (ValueError, TypeError, FloatingPointError)
ARGUMENTS = re.compile(r"^(params|grads|state|config|AdamConfig)\b")
# 100 examples a property take seconds: python -m pytest -m "not slow" leaves them out.
pytestmark = pytest.mark.slow
SETTINGS = settings(
    max_examples=100,
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -------------------------------------------------------------------------------------------------
# The reference: the documented formula, one operation at a time, on contiguous copies.


def _work(dtype):
    return np.promote_types(dtype, np.float32)  # float16 is computed in float32


def _reference(p, g, m, v, v_max, t, config):
    """Returns the new (p, m, v, v_max) of one step: p in the parameter's dtype, the moments in
    theirs (float32 for float16 parameters)."""
    dtype, moments = p.dtype, np.asarray(m).dtype
    work = _work(np.promote_types(dtype, moments))
    with np.errstate(all="ignore"):
        P = np.array(p, dtype=work, order="C")
        G = np.array(np.asarray(g), dtype=work, order="C")
        M = np.array(m, dtype=work)
        V = np.array(v, dtype=work)
        lr = config.learning_rate(t)
        if config.maximize:
            G = -G
        if config.weight_decay > 0 and not config.decoupled_weight_decay:
            G = G + P * config.weight_decay
        if config.decoupled_weight_decay:
            P = P * (1.0 - lr * config.weight_decay)
        M = M * config.beta1 + G * (1.0 - config.beta1)
        V = V * config.beta2 + (G * G) * (1.0 - config.beta2)
        second = V
        VM = None
        if config.amsgrad:
            VM = np.maximum(np.array(v_max, dtype=work), V)
            second = VM
        # The bias corrections folded into per-step scalars (docs/algorithm.md): with
        # s = sqrt(1 - beta2**t), lr * m_hat / (sqrt(v_hat) + eps) = (lr * s / bc1) * m /
        # (sqrt(v) + eps * s).
        s = (1.0 - config.beta2**t) ** 0.5
        step = (M * (lr * s / (1.0 - config.beta1**t))) / (np.sqrt(second) + config.eps * s)
        P = P - step
        # Operations on 0-d arrays give NumPy scalars: asarray keeps the dtype's byte order.
        return (
            np.asarray(P).astype(dtype),
            np.asarray(M).astype(moments),
            np.asarray(V).astype(moments),
            None if VM is None else np.asarray(VM).astype(moments),
        )


def _same(a, b):
    """Equal dtype, shape and values, NaN equal to NaN and the sign of zero compared."""
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if not np.array_equal(nan_a, nan_b):
        return False
    values = ~nan_a
    return bool(
        np.array_equal(a[values], b[values])
        and np.array_equal(np.signbit(a[values]), np.signbit(b[values]))
    )


def _gradient_is_bad(g):
    """Non-finite values: every policy but "propagate" must keep them out of the parameters."""
    array = np.asarray(g)
    return array.dtype.kind == "f" and not bool(np.all(np.isfinite(array)))


def _gradient_is_huge(g, p, config):
    """A finite value whose square overflows, in the gradient's or the parameter's work dtype,
    also after L2 decay (g + weight_decay * p, for finite p): the package may refuse it as it
    refuses non-finite values, or step with it."""
    array = np.asarray(g)
    if array.dtype.kind not in "fiu" or array.size == 0:
        return False
    with np.errstate(all="ignore"):
        big = np.abs(array.astype(np.longdouble))
        if config.weight_decay > 0 and not config.decoupled_weight_decay:
            decayed = np.asarray(p, dtype=np.longdouble)
            decayed = np.where(np.isfinite(decayed), decayed, 0) * config.weight_decay
            big = np.maximum(big, np.abs(array.astype(np.longdouble) + decayed))
        limits = [
            np.sqrt(np.finfo(_work(dtype)).max)
            for dtype in (p.dtype, array.dtype)
            if dtype.kind == "f"
        ]
        return any(bool(np.any(big > limit)) for limit in limits)


# -------------------------------------------------------------------------------------------------
# Strategies.


@st.composite
def _values(draw, shape, dtype, special=True):
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        small = st.integers(max(info.min, -100), min(info.max, 100))
        ints = draw(
            st.lists(
                st.one_of(small, st.sampled_from([info.min, info.max])),
                min_size=size,
                max_size=size,
            )
        )
        return np.array(ints, dtype).reshape(shape)
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), bool).reshape(
            shape
        )
    if dtype.kind == "c":
        return (np.arange(size) + 1j).astype(dtype).reshape(shape)
    if dtype.kind == "O":
        return np.array([float(i) for i in range(size)] + [None], object)[:size].reshape(shape)
    if dtype.kind == "U":
        return np.full(shape, "x", dtype)
    if dtype.kind == "M":
        return np.zeros(shape, dtype)
    plain = st.floats(-3.0, 3.0, allow_subnormal=False)
    elements = st.one_of(plain, plain, plain, st.sampled_from(SPECIALS)) if special else plain
    floats = draw(st.lists(elements, min_size=size, max_size=size))
    with np.errstate(all="ignore"):  # float16 and float32 round huge values to infinity
        return np.array(floats, np.float64).astype(dtype).reshape(shape)


def _layout(array, kind):
    """The same values in another memory layout."""
    if kind == "read-only":
        frozen = array.copy()
        frozen.flags.writeable = False
        return frozen
    if array.ndim == 0:
        return array.copy()  # np.asfortranarray and friends would make it 1-d
    if kind == "fortran":
        return np.asfortranarray(array)
    if kind == "strided":
        wide = np.zeros((*array.shape[:-1], 2 * array.shape[-1]), array.dtype)
        view = wide[..., ::2]
        view[...] = array
        return view
    if kind == "reversed":
        flipped = np.array(array[::-1], copy=True)
        return flipped[::-1]  # negative strides over the original order
    return np.ascontiguousarray(array)


_LAYOUTS = st.sampled_from(["C", "C", "fortran", "strided", "reversed", "read-only"])
# Up to rank 6, with few elements: a case is about layouts and values, not sizes.
_SHAPES = hnp.array_shapes(min_dims=0, max_dims=6, min_side=0, max_side=3).filter(
    lambda shape: math.prod(shape) <= 48
)


@st.composite
def _param_leaf(draw, problems, wrapper, hostile):
    shape = draw(_SHAPES)
    if hostile and draw(st.booleans()):
        kind = draw(st.sampled_from(["bad-dtype", "python-float", "list"]))
        problems.add("TypeError")
        if kind == "python-float":
            return 1.5
        if kind == "list":
            return [1.0, 2.0]
        return draw(_values(shape, draw(st.sampled_from(BAD_PARAM_DTYPES))))
    dtype = draw(st.sampled_from(PARAM_DTYPES))
    layout = draw(_LAYOUTS)
    if wrapper and layout == "read-only":
        if not hostile:
            layout = "C"
        else:
            problems.add("TypeError")
    return _layout(draw(_values(shape, dtype)), layout)


@st.composite
def _grad_leaf(draw, p, problems, hostile):
    """A gradient for parameter ``p`` (already known to be valid), or something hostile."""
    kinds = ["same"] * 6 + ["alias", "view"]
    if hostile:
        kinds += ["bad-dtype", "python", "python", "list", "broadcast", "broadcast"]
    kind = draw(st.sampled_from(kinds))
    if kind == "alias":
        return p
    if kind == "view":
        return p[...]
    if kind == "bad-dtype":
        problems.add("TypeError")
        return draw(_values(p.shape, draw(st.sampled_from(BAD_GRAD_DTYPES))))
    if kind == "python":
        value = draw(st.sampled_from([0.25, -3, True, 1 + 1j, "1.0", None, np.float32(2.0)]))
        if p.shape == () and isinstance(value, float | np.floating):
            return value  # a real scalar is a fine gradient for a 0-d parameter
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            problems.add("TypeError")
        elif p.shape != ():
            problems.add("ValueError")  # never broadcast
        return value
    if kind == "list":
        problems.add("ValueError")
        return np.zeros(p.shape).tolist() if p.ndim else [0.0]
    if kind == "broadcast":
        shapes = {(), (1,) * max(p.ndim, 1), p.shape[1:], (*p.shape, 1), p.shape[::-1]}
        shape = draw(st.sampled_from(sorted(shapes - {p.shape})))
        problems.add("ValueError")
        return np.zeros(shape)
    dtype = p.dtype if draw(st.booleans()) else draw(st.sampled_from(GRAD_DTYPES))
    return _layout(draw(_values(p.shape, dtype)), draw(_LAYOUTS))


def _containers(kind, leaves):
    if kind == "array":
        return leaves[0]
    if kind == "dict":
        return {f"k{i}": leaf for i, leaf in enumerate(leaves)}
    if kind == "OrderedDict":
        return OrderedDict((f"k{i}", leaf) for i, leaf in enumerate(leaves))
    if kind == "list":
        return list(leaves)
    if kind == "tuple":
        return tuple(leaves)
    return {1: NT1, 2: NT2, 3: NT3}[len(leaves)](*leaves)


@st.composite
def _trees(draw, wrapper=False):
    """Params and grads trees, and the errors the case must raise (empty: must not raise)."""
    problems: set[str] = set()
    # Most cases are valid; a hostile one breaks one thing: a parameter, a gradient, the
    # structure of the grads (or a repeated array), or the state (drawn by _states).
    target = draw(st.sampled_from(["none"] * 6 + ["param", "grad", "tree", "state"]))
    count = draw(st.integers(1, 3))
    kind = draw(
        st.sampled_from(["array", "dict", "OrderedDict", "list", "tuple", "namedtuple"])
        if count == 1
        else st.sampled_from(["dict", "OrderedDict", "list", "tuple", "namedtuple"])
    )
    p_leaves = [draw(_param_leaf(problems, wrapper, target == "param")) for _ in range(count)]
    g_leaves = [
        draw(_grad_leaf(p, problems, target == "grad"))
        if isinstance(p, np.ndarray) and p.dtype.kind == "f"
        else np.zeros(np.shape(p))
        for p in p_leaves
    ]
    params = _containers(kind, p_leaves)
    grads = _containers(kind, g_leaves)
    changes = ["missing", "extra", "retyped", "duplicate"] if target == "tree" else ["none"]
    change = draw(st.sampled_from([*changes, "reordered"]))
    if change == "missing" and isinstance(grads, dict):
        grads = type(grads)(list(grads.items())[1:])
        problems.add("ValueError")
    elif change == "extra" and isinstance(grads, dict):
        grads = type(grads)([*grads.items(), ("extra", np.zeros(1))])
        problems.add("ValueError")
    elif change == "reordered" and type(grads) is dict and len(grads) > 1:
        grads = dict(reversed(list(grads.items())))  # a dict is matched by key: fine
    elif change == "retyped":
        if type(grads) in (dict, OrderedDict):
            grads = (OrderedDict if type(grads) is dict else dict)(grads)
        elif isinstance(grads, list):
            grads = tuple(grads)
        elif isinstance(grads, tuple):
            grads = list(grads)
        else:
            grads = [grads]
        problems.add("ValueError")
    if change == "duplicate" and wrapper and count > 1:
        # The same array twice in one step.
        p_leaves[1] = p_leaves[0]
        params = _containers(kind, p_leaves)
        problems.add("ValueError")
    return params, grads, problems, target == "state"


@st.composite
def _configs(draw):
    lr = draw(
        st.one_of(
            st.floats(0.0, 2.0),
            st.sampled_from([0.0, 1e-3, 1e300]),
            st.builds(schedules.Constant, st.floats(0.0, 1.0)),
            st.just(schedules.warmup_cosine_decay(0.1, 2, 10)),
        )
    )
    beta = st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.9, 0.999, 1 - 2**-40]))
    return AdamConfig(
        lr,
        draw(beta),
        draw(beta),
        draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-8]))),
        draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        decoupled_weight_decay=draw(st.booleans()),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
        nonfinite=draw(st.sampled_from(["raise", "skip", "propagate"])),
        max_consecutive_skips=draw(st.one_of(st.none(), st.integers(0, 2))),
    )


def _leaves(tree):
    if isinstance(tree, np.ndarray):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def _leaves_like(tree, like):
    """The leaves of ``tree`` in the order of ``like``'s (a dict is matched by key)."""
    if isinstance(like, dict) and isinstance(tree, dict):
        return [leaf for key in like if key in tree for leaf in _leaves_like(tree[key], like[key])]
    if isinstance(like, list | tuple) and isinstance(tree, list | tuple):
        return [leaf for t, k in zip(tree, like) for leaf in _leaves_like(t, k)]
    return [tree]


def _map(function, tree):
    if isinstance(tree, dict):
        return type(tree)((key, _map(function, value)) for key, value in tree.items())
    if isinstance(tree, list):
        return [_map(function, value) for value in tree]
    if isinstance(tree, tuple):
        values = [_map(function, value) for value in tree]
        return type(tree)(*values) if hasattr(type(tree), "_fields") else tuple(values)
    return function(tree)


def _moment_of(p):
    """A C-contiguous float array shaped like ``p``, for a state (float64 for invalid leaves)."""
    if isinstance(p, np.ndarray) and p.dtype.kind == "f":
        return np.zeros(p.shape, AdamConfig().moments_dtype(p.dtype))
    return np.zeros(np.shape(p))


@st.composite
def _states(draw, params, config, problems, hostile):
    kinds = ["dtype", "shape", "amsgrad", "not-a-state"] if hostile else ["fresh", "random"]
    kind = draw(st.sampled_from(kinds))
    zeros = _map(_moment_of, params)

    def random_moment(x, nonnegative=False):
        values = draw(_values(x.shape, x.dtype))
        with np.errstate(all="ignore"):
            return np.asarray(np.abs(values)).astype(values.dtype) if nonnegative else values

    if kind == "not-a-state":
        problems.add("TypeError")
        return {"m": zeros, "v": zeros, "t": 0}
    amsgrad = config.amsgrad if kind != "amsgrad" else not config.amsgrad
    if kind == "amsgrad":
        problems.add("ValueError")
    if kind in ("random", "dtype", "shape"):
        m = _map(random_moment, zeros)
        v = _map(lambda x: random_moment(x, nonnegative=draw(st.booleans())), zeros)
        t = draw(st.one_of(st.integers(0, 10), st.sampled_from([2**24, 2**53, 2**70])))
        v_max = _map(lambda x: random_moment(x, nonnegative=True), zeros) if amsgrad else None
        skips = draw(st.integers(0, 3))
        if kind == "dtype":

            def retype(x):
                return np.zeros(x.shape, np.float64 if x.dtype == np.float32 else np.float32)

            m, v = _map(retype, m), _map(retype, v)
            v_max = None if v_max is None else _map(retype, v_max)
            problems.add("ValueError")
        if kind == "shape":
            m = _map(lambda x: np.zeros((*x.shape, 2), x.dtype), m)
            v = _map(lambda x: np.zeros((*x.shape, 2), x.dtype), v)
            if v_max is not None:
                v_max = _map(lambda x: np.zeros((*x.shape, 2), x.dtype), v_max)
            problems.add("ValueError")
        return AdamState(m=m, v=v, t=t, v_max=v_max, skipped=skips, consecutive_skips=skips)
    return AdamState(
        m=zeros, v=_map(np.copy, zeros), t=0, v_max=_map(np.copy, zeros) if amsgrad else None
    )


@st.composite
def _pure_cases(draw):
    params, grads, problems, hostile_state = draw(_trees())
    config = draw(_configs())
    state = draw(_states(params, config, problems, hostile_state))
    return params, grads, state, config, problems


def _parts(state):
    if isinstance(state, AdamState):
        return [state.m, state.v, state.v_max, state.t, state.skipped, state.consecutive_skips]
    return state


def _check_refusal(error, problems, config, grads, params):
    message = str(error)
    assert ARGUMENTS.match(message), f"the message must name the argument: {message!r}"
    if isinstance(error, FloatingPointError):
        assert config.nonfinite != "propagate", message
        assert any(
            _gradient_is_bad(g) or _gradient_is_huge(g, p, config)
            for g, p in zip(_leaves_like(grads, params), _leaves(params))
            if isinstance(p, np.ndarray)
        ), message
    elif not problems:
        pytest.fail(f"a valid call raised {type(error).__name__}: {message}")
    else:
        assert type(error).__name__ in problems, (problems, message)


# -------------------------------------------------------------------------------------------------
# adam_update.


@SETTINGS
@given(_pure_cases())
def test_adam_update_is_right_or_refuses_cleanly(case):
    params, grads, state, config, problems = case
    before = snapshot((params, grads, _parts(state)))
    try:
        new_params, new_state = adam_update(params, grads, state, config)
    except ERRORS as error:
        assert snapshot((params, grads, _parts(state))) == before
        _check_refusal(error, problems, config, grads, params)
        return
    assert snapshot((params, grads, _parts(state))) == before, "inputs untouched"
    assert not problems, f"expected {problems}, got a result"
    p_leaves, g_leaves = _leaves(params), _leaves_like(grads, params)
    new_leaves = _leaves(new_params)
    assert type(new_params) is type(params) and len(new_leaves) == len(p_leaves)
    bad = any(_gradient_is_bad(g) for g in g_leaves)
    if new_state.t == state.t:
        # A skipped step: only with the skip policy, for bad gradients, within the bound.
        assert config.nonfinite == "skip"
        assert bad or any(_gradient_is_huge(g, p, config) for g, p in zip(g_leaves, p_leaves))
        assert new_state.skipped == state.skipped + 1
        assert new_state.consecutive_skips == state.consecutive_skips + 1
        bound = config.max_consecutive_skips
        assert bound is None or new_state.consecutive_skips <= bound
        for new, p in zip(new_leaves, p_leaves):
            assert _same(new, p) and not np.shares_memory(new, p)
        assert new_state.m is state.m and new_state.v is state.v
        return
    assert not bad or config.nonfinite == "propagate", "non-finite gradients were stepped with"
    assert new_state.t == state.t + 1 and type(new_state.t) is int
    assert new_state.skipped == state.skipped and new_state.consecutive_skips == 0
    m_leaves, v_leaves = _leaves(state.m), _leaves(state.v)
    vm_leaves = _leaves(state.v_max) if config.amsgrad else [None] * len(p_leaves)
    new_m, new_v = _leaves(new_state.m), _leaves(new_state.v)
    new_vm = _leaves(new_state.v_max) if config.amsgrad else [None] * len(p_leaves)
    for index, (p, g) in enumerate(zip(p_leaves, g_leaves)):
        assert np.shape(g) == p.shape, "a gradient of another shape was broadcast"
        expected = _reference(
            p, g, m_leaves[index], v_leaves[index], vm_leaves[index], new_state.t, config
        )
        got = (new_leaves[index], new_m[index], new_v[index], new_vm[index])
        for name, want, have in zip(("params", "m", "v", "v_max"), expected, got):
            assert _same(want, have), (index, name, want, have)
        assert new_leaves[index].flags.writeable and not new_m[index].flags.writeable


# -------------------------------------------------------------------------------------------------
# Adam.step.


@st.composite
def _wrapper_cases(draw):
    params, grads, problems, _ = draw(_trees(wrapper=True))
    config = draw(_configs())
    warmup = draw(st.integers(0, 2))
    return params, grads, config, warmup, problems


def _warm_up(opt, params, steps, seed):
    """Steps the valid, writeable leaves with plain gradients, so that their states are not zero.

    A leaf whose step is refused (its L2-decayed gradient overflows, say) stays as it was.
    """
    rng = np.random.default_rng(seed)
    leaves = [
        p
        for p in _leaves(params)
        if isinstance(p, np.ndarray) and p.dtype.kind == "f" and p.flags.writeable
    ]
    unique = list({id(p): p for p in leaves}.values())
    for _ in range(steps):
        for p in unique:
            with contextlib.suppress(FloatingPointError):
                opt.step(p, rng.standard_normal(p.shape).astype(p.dtype))


@SETTINGS
@given(_wrapper_cases(), st.integers(0, 2**32 - 1))
def test_adam_step_is_right_or_refuses_cleanly(case, seed):
    params, grads, config, warmup, problems = case
    opt = Adam.from_config(config)
    _warm_up(opt, params, warmup, seed)
    p_leaves, g_leaves = _leaves(params), _leaves_like(grads, params)
    states = []
    for p in p_leaves:
        try:
            states.append(opt.get_state(p))
        except (KeyError, TypeError):
            states.append(None)
    copies = [np.array(p, copy=True) if isinstance(p, np.ndarray) else p for p in p_leaves]
    grad_copies = [np.array(g, copy=True) if isinstance(g, np.ndarray) else g for g in g_leaves]
    before = (snapshot(params), snapshot(grads), wrapper_snapshot(opt))
    try:
        opt.step(params, grads)
    except ERRORS as error:
        assert (snapshot(params), snapshot(grads), wrapper_snapshot(opt)) == before
        _check_refusal(error, problems, config, grads, params)
        return
    assert not problems, f"expected {problems}, got a result"
    bad = any(_gradient_is_bad(g) for g in grad_copies)  # a gradient may be a parameter
    after = [opt.get_state(p) for p in p_leaves]
    old_t = [0 if state is None else state.t for state in states]
    if all(state.t == t for state, t in zip(after, old_t)):
        assert config.nonfinite == "skip" and p_leaves
        assert bad or any(_gradient_is_huge(g, p, config) for g, p in zip(grad_copies, copies))
        for p, copy in zip(p_leaves, copies):
            assert _same(p, copy)
        return
    assert not bad or config.nonfinite == "propagate", "non-finite gradients were stepped with"
    for p, g, copy, state, new in zip(p_leaves, grad_copies, copies, states, after):
        assert np.shape(g) == p.shape, "a gradient of another shape was broadcast"
        if state is None:
            zeros = np.zeros(p.shape, config.moments_dtype(p.dtype))
            state = AdamState(m=zeros, v=zeros, t=0, v_max=zeros if config.amsgrad else None)
        expected = _reference(copy, g, state.m, state.v, state.v_max, state.t + 1, config)
        assert new.t == state.t + 1
        for name, want, have in zip(
            ("params", "m", "v", "v_max"), expected, (p, new.m, new.v, new.v_max)
        ):
            assert _same(want, have), (name, want, have)
    for g, copy in zip(g_leaves, grad_copies):
        if isinstance(g, np.ndarray) and not any(np.may_share_memory(g, p) for p in p_leaves):
            assert _same(g, copy), "a gradient was written"
