"""adam_update is pure, as a property over trees, dtypes, memory layouts and configs.

Hypothesis draws a tree (dicts, lists, tuples and namedtuples nested, one to six leaves) of
float16, float32 and float64 arrays, 0-d and empty ones among them, each parameter and gradient
laid out C-ordered, Fortran-ordered, strided (every other element of a larger buffer whose gaps
hold NaN) or with negative strides; and a valid config. Two steps of adam_init + adam_update must
then:

* leave every input exactly as it was: bytes, dtype, shape, strides and flags of each parameter,
  gradient and state array, and the whole buffer behind each strided view, gaps included;
* return new parameters that share no memory with any input, with the new state or with each
  other, in containers of the same types and key order as the parameters, with their dtypes and
  shapes;
* return a state whose arrays are read-only and share no memory with anything else, and count
  the step;
* give bit for bit what the same step gives on C-contiguous copies, and what ``Adam.step`` gives
  in place on copies laid out the same way.

A step skipped for a non-finite gradient (``nonfinite="skip"``) must return copies of the
parameters, keep the moments and ``t``, and count the skip. Arrays longer than a kernel block,
Fortran-ordered, strided or reversed, must give the results of their contiguous copies.

The tree helpers here are written anew, not taken from the package, so that they check it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update, schedules

# The NumPy kernel's block size: the kernel walks arrays longer than this in blocks of it.
BLOCK_SIZE = 8192

DTYPES = (np.float16, np.float32, np.float64)
LAYOUTS = ("C", "F", "strided", "reversed")
STEPS = 2
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Pair(NamedTuple):
    first: Any
    second: Any


class Spec:
    """A leaf still to be drawn: its shape, dtypes, and the layouts of parameter and gradient."""

    __slots__ = ("dtype", "g_dtype", "g_layout", "p_layout", "shape")

    def __init__(
        self, shape: tuple[int, ...], dtype: Any, g_dtype: Any, p_layout: str, g_layout: str
    ):
        self.shape = shape
        self.dtype = dtype
        self.g_dtype = g_dtype
        self.p_layout = p_layout
        self.g_layout = g_layout


# ---------------------------------------------------------------------------------------------------
# Trees, walked independently of the package.

LEAF_TYPES = (np.ndarray, Spec)


def leaves(tree: Any) -> list[Any]:
    """The leaves in order: dict values in key order, sequences and namedtuples in field order."""
    if isinstance(tree, LEAF_TYPES):
        return [tree]
    children = tree.values() if isinstance(tree, dict) else tree
    return [leaf for child in children for leaf in leaves(child)]


def rebuild(tree: Any, function: Callable[[Any], Any]) -> Any:
    """A tree of the same containers with ``function`` applied to each leaf, in order."""
    if isinstance(tree, LEAF_TYPES):
        return function(tree)
    if type(tree) is dict:
        return {key: rebuild(value, function) for key, value in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(rebuild(value, function) for value in tree)
    return type(tree)(*(rebuild(value, function) for value in tree))  # A namedtuple.


def structure(tree: Any) -> Any:
    """The container types and keys, in order, with every leaf replaced by None."""
    if isinstance(tree, LEAF_TYPES):
        return None
    if isinstance(tree, dict):
        return (type(tree), tuple(tree), tuple(structure(value) for value in tree.values()))
    return (type(tree), None, tuple(structure(value) for value in tree))


def state_arrays(state: AdamState) -> list[np.ndarray]:
    trees = [state.m, state.v] + ([] if state.v_max is None else [state.v_max])
    return [leaf for tree in trees for leaf in leaves(tree)]


# ---------------------------------------------------------------------------------------------------
# Memory layouts.


def with_layout(values: np.ndarray, layout: str) -> np.ndarray:
    """A writeable array equal to ``values`` and laid out in memory as ``layout`` says."""
    if layout in ("C", "F"):
        return np.array(values, order=layout)
    # The trailing Ellipsis keeps a 0-d array an array when indexed.
    every_other = (*(slice(None, None, 2) for _ in values.shape), Ellipsis)
    backwards = (*(slice(None, None, -1) for _ in values.shape), Ellipsis)
    if layout == "strided":
        buffer = np.full(tuple(2 * n for n in values.shape), np.nan, values.dtype)
        view = buffer[every_other]
        view[...] = values
        return view
    return np.array(values[backwards], order="C")[backwards]


def fingerprint(array: np.ndarray) -> tuple[Any, ...]:
    """Everything about an array that a write could change, and the buffer behind a view."""
    base = array.base.tobytes() if isinstance(array.base, np.ndarray) else None
    flags = (array.flags.writeable, array.flags.c_contiguous, array.flags.f_contiguous)
    return (array.tobytes(), array.dtype.str, array.shape, array.strides, flags, base)


def assert_same_bits(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert type(ours) is np.ndarray, what
    assert ours.dtype == theirs.dtype, what
    assert ours.shape == theirs.shape, what
    assert ours.tobytes() == theirs.tobytes(), what


def assert_trees_same_bits(ours: Any, theirs: Any, what: str) -> None:
    assert structure(ours) == structure(theirs), what
    for index, (a, b) in enumerate(zip(leaves(ours), leaves(theirs))):
        assert_same_bits(a, b, f"{what}, leaf {index}")


def assert_no_shared_memory(group: list[np.ndarray], others: list[np.ndarray], what: str) -> None:
    """No array of ``group`` shares memory with one of ``others`` or with another of ``group``.

    An empty array holds no memory and shares none.
    """
    for i, a in enumerate(group):
        for j, b in enumerate(others):
            assert not np.shares_memory(a, b), f"{what}: leaf {i} shares memory with input {j}"
        for j, b in enumerate(group[:i]):
            assert not np.shares_memory(a, b), f"{what}: leaves {j} and {i} share memory"


# ---------------------------------------------------------------------------------------------------
# Strategies.

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
specs = st.builds(
    Spec,
    shapes,
    st.sampled_from(DTYPES),
    st.sampled_from(DTYPES),
    st.sampled_from(LAYOUTS),
    st.sampled_from(LAYOUTS),
)
keys = st.text("abcdefgh", min_size=1, max_size=2)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(keys, children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.builds(Pair, children, children),
    )


trees = st.recursive(specs, containers, max_leaves=6).filter(lambda tree: len(leaves(tree)) <= 6)


@st.composite
def config_kwargs(draw: st.DrawFn, nonfinite: str | None = None) -> dict[str, Any]:
    """Keyword arguments valid for AdamConfig and Adam alike."""
    beta2 = draw(st.floats(0.0, 0.9999))
    return {
        "lr": draw(st.one_of(st.floats(0.0, 1.0), st.just(schedules.CosineDecay(0.5, 3)))),
        # beta1**2 < beta2 keeps m_hat / sqrt(v_hat) of order 1, as Adam's analysis assumes.
        "beta1": draw(st.floats(0.0, 0.99 * math.sqrt(beta2))),
        "beta2": beta2,
        "eps": draw(st.sampled_from([1e-12, 1e-8, 1e-3])),
        "weight_decay": draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        "decoupled_weight_decay": draw(st.booleans()),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
        "nonfinite": nonfinite or draw(st.sampled_from(["raise", "skip", "propagate"])),
    }


def draw_values(data: st.DataObject, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    # Magnitudes up to 100 keep g**2 within float16's range (|g + wd * p| <= 200).
    width = np.dtype(dtype).itemsize * 8
    elements = st.floats(-100.0, 100.0, width=width)
    return data.draw(hnp.arrays(dtype, shape, elements=elements))


def draw_problem(data: st.DataObject, skeleton: Any) -> tuple[Any, list[Any]]:
    params = rebuild(
        skeleton, lambda spec: with_layout(draw_values(data, spec.dtype, spec.shape), spec.p_layout)
    )
    grads = [
        rebuild(
            skeleton,
            lambda spec: with_layout(draw_values(data, spec.g_dtype, spec.shape), spec.g_layout),
        )
        for _ in range(STEPS)
    ]
    return params, grads


def copy_as(tree: Any, layouts: list[str]) -> Any:
    """Copies of the leaves of ``tree``, each laid out as the next of ``layouts`` says."""
    remaining = iter(layouts)
    return rebuild(tree, lambda leaf: with_layout(leaf, next(remaining)))


def layouts(skeleton: Any, which: str) -> list[str]:
    return [getattr(spec, which) for spec in leaves(skeleton)]


# Stored in float16, v can underflow to 0 where m does not (v ~ (1 - beta2) * g**2); the next
# step then divides m by eps alone and may overflow float16. That is arithmetic, not purity, so
# these tests let such values pass silently and compare bits, which they keep.
def quiet() -> np.errstate:
    return np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore")


# ---------------------------------------------------------------------------------------------------
# The properties.


def check_step(params, grads, state, new_params, new_state, before) -> None:
    """Asserts everything one pure step promises about its inputs and outputs."""
    inputs = leaves(params) + leaves(grads) + state_arrays(state)
    assert [fingerprint(leaf) for leaf in inputs] == before, "an input changed"

    assert structure(new_params) == structure(params)
    for new, old in zip(leaves(new_params), leaves(params)):
        assert type(new) is np.ndarray
        assert (new.dtype, new.shape) == (old.dtype, old.shape)
    for tree in (new_state.m, new_state.v):
        assert structure(tree) == structure(params)
    assert (new_state.v_max is None) == (state.v_max is None)
    if new_state.v_max is not None:
        assert structure(new_state.v_max) == structure(params)
    for new, old in zip(state_arrays(new_state), state_arrays(state)):
        assert (new.dtype, new.shape) == (old.dtype, old.shape)
    assert (new_state.t, new_state.skipped) == (state.t + 1, state.skipped)

    new_p, new_s = leaves(new_params), state_arrays(new_state)
    assert_no_shared_memory(new_p, inputs + new_s, "new params")
    assert_no_shared_memory(new_s, inputs + new_p, "new state")
    for leaf in new_s:
        assert not leaf.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            leaf[...] = 0


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_adam_update_is_pure(data):
    skeleton = data.draw(trees, label="tree")
    kwargs = data.draw(config_kwargs(), label="config")
    config = AdamConfig(**kwargs)
    params, grads = draw_problem(data, skeleton)

    p_layouts, g_layouts = layouts(skeleton, "p_layout"), layouts(skeleton, "g_layout")
    c_layouts = ["C"] * len(p_layouts)
    contiguous = copy_as(params, c_layouts)
    contiguous_state = adam_init(contiguous, config)
    in_place = copy_as(params, p_layouts)
    opt = Adam(**kwargs)
    before = [fingerprint(x) for x in leaves(params)]
    state = adam_init(params, config)
    assert [fingerprint(x) for x in leaves(params)] == before
    assert (state.t, state.skipped) == (0, 0)
    assert_no_shared_memory(state_arrays(state), leaves(params), "adam_init")
    for leaf in state_arrays(state):
        assert not leaf.flags.writeable
        assert not leaf.any()
    with quiet():
        for g in grads:
            before = [fingerprint(x) for x in leaves(params) + leaves(g) + state_arrays(state)]
            new_params, new_state = adam_update(params, g, state, config)
            check_step(params, g, state, new_params, new_state, before)

            contiguous, contiguous_state = adam_update(
                contiguous, copy_as(g, c_layouts), contiguous_state, config
            )
            assert_trees_same_bits(new_params, contiguous, "params from C-contiguous copies")
            assert_trees_same_bits(new_state.m, contiguous_state.m, "m from C-contiguous copies")
            assert_trees_same_bits(new_state.v, contiguous_state.v, "v from C-contiguous copies")

            opt.step(in_place, copy_as(g, g_layouts))
            assert_trees_same_bits(in_place, new_params, "Adam.step")
            for index, (leaf, m, v) in enumerate(
                zip(leaves(in_place), leaves(new_state.m), leaves(new_state.v))
            ):
                wrapped = opt.get_state(leaf)
                assert wrapped.t == new_state.t
                assert_same_bits(wrapped.m, m, f"Adam.step m, leaf {index}")
                assert_same_bits(wrapped.v, v, f"Adam.step v, leaf {index}")
                if new_state.v_max is not None:
                    v_max = leaves(new_state.v_max)[index]
                    assert_same_bits(wrapped.v_max, v_max, f"Adam.step v_max, leaf {index}")
            # The next step starts from the new values, laid out as the first were.
            params, state = copy_as(new_params, p_layouts), new_state


def poison(tree: Any, index: int, position: int, value: float) -> None:
    """Writes ``value`` at flat ``position`` of leaf ``index`` of ``tree``."""
    target = leaves(tree)[index]
    target[np.unravel_index(position, target.shape)] = value


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_a_skipped_step_returns_copies_and_counts_the_skip(data):
    skeleton = data.draw(trees, label="tree")
    kwargs = data.draw(config_kwargs("skip"), label="config")
    config = AdamConfig(**kwargs)
    params, (good, bad) = draw_problem(data, skeleton)
    sizes = [leaf.size for leaf in leaves(params)]
    assume(any(sizes))  # Something must hold the NaN.
    index = data.draw(st.sampled_from([i for i, size in enumerate(sizes) if size]))
    position = data.draw(st.integers(0, sizes[index] - 1))
    poison(bad, index, position, data.draw(st.sampled_from([np.nan, np.inf, -np.inf])))

    opt, in_place = Adam(**kwargs), copy_as(params, layouts(skeleton, "p_layout"))
    with quiet():
        params, state = adam_update(params, good, adam_init(params, config), config)
        opt.step(in_place, good)
        before = [fingerprint(x) for x in leaves(params) + leaves(bad) + state_arrays(state)]
        same, skipped = adam_update(params, bad, state, config)
        opt.step(in_place, bad)

    inputs = leaves(params) + leaves(bad) + state_arrays(state)
    assert [fingerprint(x) for x in inputs] == before, "an input changed"
    assert (skipped.t, skipped.skipped) == (state.t, state.skipped + 1)
    assert_trees_same_bits(same, params, "params after a skipped step")
    assert_no_shared_memory(leaves(same), inputs, "params after a skipped step")
    for name in ("m", "v", "v_max"):
        if getattr(state, name) is not None:
            assert_trees_same_bits(getattr(skipped, name), getattr(state, name), name)
    for leaf in state_arrays(skipped):
        assert not leaf.flags.writeable

    assert_trees_same_bits(in_place, params, "Adam.step after a skipped step")
    for leaf in leaves(in_place):
        wrapped = opt.get_state(leaf)
        assert (wrapped.t, wrapped.skipped) == (1, 1)


# ---------------------------------------------------------------------------------------------------
# Layouts of arrays longer than a block.


def large_problem(dtype: Any, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    shape = (3, BLOCK_SIZE // 2 + 7)  # Three blocks and a bit, walked in C order.
    params = rng.normal(0.0, 1.0, shape).astype(dtype)
    grads = [rng.normal(0.0, 1.0, shape).astype(dtype) for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("layout", ["F", "strided", "reversed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: dtype.__name__)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True},
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    ids=["l2_amsgrad_maximize", "adamw"],
)
def test_layouts_of_large_arrays_give_the_contiguous_results(layout, dtype, kwargs):
    rng = np.random.default_rng(0)
    params, grads = large_problem(dtype, rng)
    config = AdamConfig(**kwargs)
    laid_out = with_layout(params, layout)
    state, contiguous_state = adam_init(laid_out, config), adam_init(params, config)
    contiguous, in_place, opt = params, with_layout(params, layout), Adam(**kwargs)
    for g in grads:
        before = fingerprint(laid_out)
        new, state = adam_update(laid_out, with_layout(g, layout), state, config)
        assert fingerprint(laid_out) == before
        contiguous, contiguous_state = adam_update(contiguous, g, contiguous_state, config)
        opt.step(in_place, with_layout(g, layout))
        assert_same_bits(new, contiguous, f"{layout} params")
        assert_same_bits(state.m, contiguous_state.m, f"{layout} m")
        assert_same_bits(state.v, contiguous_state.v, f"{layout} v")
        assert_same_bits(np.array(in_place), contiguous, f"Adam.step on {layout} params")
        laid_out = with_layout(new, layout)
