"""Arrays of other libraries: each installed library against the NumPy path.

The ``xp`` fixture runs a test once per installed library, as SciPy's test suite does: NumPy
itself, array-api-strict, JAX, PyTorch and dask, each skipped with a reason where it is not
installed. array-api-strict's arrays live on a device of its own (``Device("device1")``), which
refuses every conversion to NumPy: a step that called NumPy on them would fail, so the
trajectories that pass on array-api-strict show that the generic kernel uses the array API alone.
That is how this suite covers libraries whose arrays live on a GPU (CuPy, torch on CUDA), which
the CPU-only test machines cannot run.

The libraries are imported inside the fixtures, never at the top of a module: importing JAX,
torch and dask takes seconds. JAX computes in float32 unless ``jax_enable_x64`` is set; the tests
enable it with the ``jax.enable_x64(True)`` context manager, never globally, since other test
files use JAX in float32. Library-specific tests are in ``test_array_api_jax.py``,
``test_array_api_torch.py`` and ``test_array_api_dask.py``, which import the functions below.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np
import pytest

import adam_functional as af
from adam_functional import AdamConfig, adam_init, adam_update, schedules

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
# The step whose gradient holds a NaN in the cases that say so (0-based).
NAN_STEP = 4
RTOL = 1e-12


# -------------------------------------------------------------------------------------------------
# The libraries.


class Library(NamedTuple):
    """How a test makes, reads and recognises the arrays of one library."""

    name: str
    #: NumPy array -> an array of this library (a copy, on the library's test device).
    asarray: Callable[[np.ndarray], Any]
    #: An array of this library -> a NumPy copy.
    to_numpy: Callable[[Any], np.ndarray]
    #: A context in which float64 arrays stay float64 (JAX needs x64 enabled).
    precise: Callable[[], contextlib.AbstractContextManager[Any]]
    #: The library's name for a dtype: float16, float32, float64 (None where it has none).
    dtype: Callable[[str], Any]
    #: ``(params, state)`` after a step, settled: dask runs the graphs (``dask.persist``), so
    #: that they do not grow over the steps; the other libraries return them as they are.
    settle: Callable[[Any, af.AdamState], tuple[Any, af.AdamState]] = lambda p, s: (p, s)


LIBRARIES = ("numpy", "array_api_strict", "jax", "torch", "dask")


def load_library(name: str) -> Library:
    """The `Library` for ``name``, or a skip with the reason when it is not installed."""
    if name == "numpy":
        return Library(
            "numpy",
            lambda a: np.array(a, copy=True),
            lambda x: np.array(x, copy=True),
            contextlib.nullcontext,
            lambda dtype: np.dtype(dtype),
        )
    pytest.importorskip(
        "array_api_compat",
        reason='array-api-compat is not installed: pip install "adam-functional[array-api]"',
    )
    if name == "array_api_strict":
        xs = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed")
        # A device that refuses every conversion to NumPy (np.asarray raises on it).
        device, cpu = xs.Device("device1"), xs.Device("CPU_DEVICE")
        return Library(
            name,
            lambda a: xs.asarray(np.array(a, copy=True), device=device),
            lambda x: np.array(xs.asarray(x, device=cpu), copy=True),
            contextlib.nullcontext,
            lambda dtype: getattr(xs, dtype, None),
        )
    if name == "jax":
        jax = pytest.importorskip("jax", reason="jax is not installed")
        jnp = jax.numpy
        return Library(
            name,
            lambda a: jnp.asarray(np.array(a, copy=True)),
            lambda x: np.array(x, copy=True),
            lambda: jax.enable_x64(True),
            lambda dtype: jnp.dtype(dtype),
        )
    if name == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        return Library(
            name,
            lambda a: torch.asarray(np.array(a, copy=True), copy=True),
            lambda x: np.array(x.detach().cpu().numpy(), copy=True),
            contextlib.nullcontext,
            lambda dtype: getattr(torch, dtype),
        )
    assert name == "dask", name
    da = pytest.importorskip("dask.array", reason="dask is not installed")
    import dask

    def settle(params: Any, state: af.AdamState) -> tuple[Any, af.AdamState]:
        # dask.persist looks into dicts, not into an AdamState: its fields go as a dict.
        params, fields = dask.persist(params, attrs.asdict(state, recurse=False))
        return params, af.AdamState(**fields)

    return Library(
        name,
        # Chunks of 2 along every axis: most arrays here are split into several chunks.
        lambda a: da.from_array(np.array(a, copy=True), chunks=2),
        lambda x: np.array(x.compute(), copy=True),
        contextlib.nullcontext,
        lambda dtype: np.dtype(dtype),
        settle,
    )


# Eager JAX compiles each operation at its first use, and dask builds a graph layer per operation:
# seconds per trajectory. Their runs of the ``xp`` tests are slow; the quick suite covers them in
# test_array_api_jax.py (under jit) and test_array_api_dask.py.
SLOW_LIBRARIES = ("jax", "torch", "dask")


@pytest.fixture(
    params=[
        pytest.param(name, marks=pytest.mark.slow if name in SLOW_LIBRARIES else ())
        for name in LIBRARIES
    ]
)
def xp(request: pytest.FixtureRequest) -> Library:
    """Each installed library, NumPy included."""
    return load_library(request.param)


@pytest.fixture(params=LIBRARIES[1:])
def foreign(request: pytest.FixtureRequest) -> Library:
    """Each installed library other than NumPy."""
    return load_library(request.param)


# -------------------------------------------------------------------------------------------------
# Trees and trajectories.


def leaves(tree: Any) -> list[Any]:
    """The leaves of a tree of dicts and lists (None included), dicts in the order of their sorted
    keys: JAX sorts the keys of the dicts it rebuilds."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in leaves(tree[key])]
    if isinstance(tree, list | tuple):
        return [leaf for child in tree for leaf in leaves(child)]
    return [tree]


def tree_map(function: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``function`` applied to the leaves of a tree of dicts and lists (None stays None)."""
    if isinstance(tree, dict):
        return {key: tree_map(function, tree[key], *(r[key] for r in rest)) for key in tree}
    if isinstance(tree, list):
        return [tree_map(function, *children) for children in zip(tree, *rest)]
    return None if tree is None else function(tree, *rest)


def count(value: Any, lib: Library) -> int:
    """A state's count as an int, whether it is an int or a 0-d array."""
    return value if isinstance(value, int) else int(lib.to_numpy(value))


def problem(dtype: str = "float64", nan: bool = False) -> tuple[Any, list[Any]]:
    """A tree of three parameters (a matrix, a vector, a 0-d array) and ``STEPS`` gradients;
    with ``nan``, the gradient of step ``NAN_STEP`` holds a NaN in one leaf."""
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), np.array(0.7)]}
    grads = [
        {"w": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), np.array(rng.normal())]}
        for _ in range(STEPS)
    ]
    if nan:
        grads[NAN_STEP]["b"][0][2] = np.nan
    cast = {"w": dtype, "b": [dtype, dtype]}
    return (
        tree_map(lambda a, d: a.astype(d), params, cast),
        [tree_map(lambda a, d: a.astype(d), g, cast) for g in grads],
    )


SKIP = AdamConfig(lr=0.01, nonfinite="skip")
#: name -> (config or tree of configs, whether a gradient holds a NaN).
CASES: dict[str, tuple[Any, bool]] = {
    "plain": (AdamConfig(lr=0.01), False),
    "l2": (AdamConfig(lr=0.01, weight_decay=0.05), False),
    "decoupled": (AdamConfig(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), False),
    "amsgrad": (AdamConfig(lr=0.01, amsgrad=True), False),
    "maximize": (AdamConfig(lr=0.01, maximize=True), False),
    "nesterov": (AdamConfig(lr=0.01, nesterov=True), False),
    "eps_root": (AdamConfig(lr=0.01, eps_root=1e-6), False),
    "schedule": (AdamConfig(lr=schedules.warmup_cosine_decay(0.05, 3, 10, end_value=0.001)), False),
    "skip": (SKIP, True),
    "propagate": (AdamConfig(lr=0.01, nonfinite="propagate"), True),
    # Every option at once, a different set per leaf (AMSGrad on some leaves only).
    "everything": (
        {
            "w": AdamConfig(
                lr=0.02, amsgrad=True, weight_decay=0.05, eps_root=1e-8, nonfinite="skip"
            ),
            "b": [
                AdamConfig(
                    lr=0.01,
                    beta1=0.8,
                    nesterov=True,
                    maximize=True,
                    weight_decay=0.1,
                    decoupled_weight_decay=True,
                    nonfinite="skip",
                ),
                AdamConfig(lr=0.03, beta2=0.99, eps=1e-6, nonfinite="skip"),
            ],
        },
        True,
    ),
}


def under_jit(config: Any) -> Any:
    """``config`` for a traced step: "raise" cannot raise there, so it becomes "skip"."""
    if isinstance(config, AdamConfig):
        return attrs.evolve(config, nonfinite="skip") if config.nonfinite == "raise" else config
    return tree_map(under_jit, config)


def numpy_run(params: Any, grads: list[Any], config: Any) -> tuple[Any, af.AdamState]:
    """The reference: the NumPy path over every gradient."""
    state = adam_init(params, config)
    for g in grads:
        params, state = adam_update(params, g, state, config)
    return params, state


def assert_matches(
    params: Any, state: af.AdamState, expected: tuple[Any, af.AdamState], lib: Library, rtol: float
) -> None:
    """``params`` and ``state`` (of ``lib``) equal the NumPy ones to ``rtol``, NaN for NaN."""
    expected_params, expected_state = expected
    for name in ("t", "skipped", "consecutive_skips"):
        assert count(getattr(state, name), lib) == getattr(expected_state, name), name
    pairs = [(params, expected_params, "params")]
    pairs += [(getattr(state, n), getattr(expected_state, n), n) for n in ("m", "v", "v_max")]
    for got, want, name in pairs:
        if want is None:
            assert got is None, name
            continue
        for a, b in zip(leaves(got), leaves(want), strict=True):
            if b is None:
                assert a is None, name
                continue
            np.testing.assert_allclose(lib.to_numpy(a), b, rtol=rtol, atol=0, err_msg=name)


# -------------------------------------------------------------------------------------------------
# Trajectories.


# "everything" (every option, a NaN skipped) and the schedule run in the quick suite; the cases of
# one option each tell which option differs, and are slow.
QUICK_CASES = ("everything", "schedule")
CASE_PARAMS = [
    pytest.param(case, marks=() if case in QUICK_CASES else pytest.mark.slow) for case in CASES
]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_trajectory_equals_the_numpy_path(
    xp: Library, case: str, request: pytest.FixtureRequest
) -> None:
    config, nan = CASES[case]
    params, grads = problem(nan=nan)
    expected = numpy_run(params, grads, config)
    with xp.precise():
        p = tree_map(xp.asarray, params)
        state = adam_init(p, config)
        for g in grads:
            p, state = xp.settle(*adam_update(p, tree_map(xp.asarray, g), state, config))
        assert_matches(p, state, expected, xp, RTOL)
    if nan and config is SKIP:
        assert expected[1].t == STEPS - 1 and expected[1].skipped == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_results_keep_the_library_dtype_and_device(xp: Library, dtype: str) -> None:
    compat = pytest.importorskip("array_api_compat", reason="array-api-compat is not installed")
    config = CASES["everything"][0]
    params, grads = problem(dtype)
    with xp.precise():
        p0 = tree_map(xp.asarray, params)
        state = adam_init(p0, config)
        p, state = adam_update(p0, tree_map(xp.asarray, grads[0]), state, config)
        for new, old in zip(leaves(p), leaves(p0), strict=True):
            assert type(new) is type(old)
            assert new.dtype == old.dtype == xp.dtype(dtype)
            assert compat.device(new) == compat.device(old)
        for name in ("m", "v", "v_max"):
            for new, old in zip(leaves(getattr(state, name)), leaves(p0), strict=True):
                if new is None:
                    assert name == "v_max"
                    continue
                assert type(new) is type(old), name
                assert new.dtype == xp.dtype(dtype), name
                assert compat.device(new) == compat.device(old), name


def test_float32_stays_float32(xp: Library) -> None:
    config = CASES["everything"][0]
    params, grads = problem("float32", nan=True)
    p = tree_map(xp.asarray, params)  # No x64 for JAX: float32 is its default.
    state = adam_init(p, config)
    for g in grads[: NAN_STEP + 2]:
        p, state = xp.settle(*adam_update(p, tree_map(xp.asarray, g), state, config))
    for name, tree in [("params", p), ("m", state.m), ("v", state.v), ("v_max", state.v_max)]:
        for leaf in leaves(tree):
            assert leaf is None or leaf.dtype == xp.dtype("float32"), name


def test_float32_follows_the_numpy_path(xp: Library) -> None:
    # A count held in a lazy array (dask after a "skip") gives the bias corrections as
    # -expm1(t * log(beta)) in float32, within a few ulps of the float64 ones.
    config = CASES["everything"][0]
    params, grads = problem("float32", nan=True)
    expected = numpy_run(params, grads, config)
    p = tree_map(xp.asarray, params)
    state = adam_init(p, config)
    for g in grads:
        p, state = xp.settle(*adam_update(p, tree_map(xp.asarray, g), state, config))
    # The same operations in the same order, in float32; a few ulps for fused arithmetic (XLA).
    assert_matches(p, state, expected, xp, rtol=1e-6)


def test_float16_parameters_get_float32_moments(
    xp: Library, request: pytest.FixtureRequest
) -> None:
    if xp.dtype("float16") is None:
        pytest.skip(f"{xp.name} has no float16")
    params = np.linspace(-1, 1, 6).astype(np.float16)
    grads = [np.full(6, 0.5, np.float16), np.linspace(2, -2, 6).astype(np.float16)]
    config = AdamConfig(lr=0.01)
    expected = numpy_run(params, grads, config)
    p = xp.asarray(params)
    state = adam_init(p, config)
    for g in grads:
        p, state = adam_update(p, xp.asarray(g), state, config)
    assert p.dtype == xp.dtype("float16")
    assert state.m.dtype == state.v.dtype == xp.dtype("float32")
    np.testing.assert_array_equal(xp.to_numpy(p), expected[0])
    np.testing.assert_allclose(xp.to_numpy(state.v), expected[1].v, rtol=1e-6)


def test_inputs_are_left_as_they_were(xp: Library) -> None:
    config = CASES["everything"][0]
    params, grads = problem()
    with xp.precise():
        p = tree_map(xp.asarray, params)
        g = tree_map(xp.asarray, grads[0])
        state = adam_init(p, config)
        p1, state1 = adam_update(p, g, state, config)
        adam_update(p1, g, state1, config)
        for got, want in zip(leaves(p), leaves(params), strict=True):
            np.testing.assert_array_equal(xp.to_numpy(got), want)
        for got, want in zip(leaves(g), leaves(grads[0]), strict=True):
            np.testing.assert_array_equal(xp.to_numpy(got), want)
        assert all(not np.any(xp.to_numpy(m)) for m in leaves(state.m))
        assert count(state.t, xp) == 0 and count(state1.t, xp) == 1


# -------------------------------------------------------------------------------------------------
# The in-place wrapper.


@pytest.mark.parametrize("config", [SKIP, CASES["everything"][0]["w"]], ids=["plain", "options"])
def test_adam_step_writes_mutable_arrays_in_place_and_refuses_immutable_ones(
    foreign: Library, config: AdamConfig
) -> None:
    params, grads = problem()
    w = params["w"]
    opt = af.Adam.from_config(config)
    if foreign.name in ("jax", "dask"):
        with foreign.precise():
            p = foreign.asarray(w)
            with pytest.raises(
                TypeError,
                match=rf"^params: {foreign.name} arrays cannot be updated in place; "
                r"adam_update\(params, grads, state, config\) returns new ones$",
            ):
                opt.step(p, foreign.asarray(grads[0]["w"]))
            np.testing.assert_array_equal(foreign.to_numpy(p), w)
        assert len(opt.m) == 0
        return
    expected = w.copy()
    reference = af.Adam.from_config(config)
    p = foreign.asarray(w)
    for g in grads:
        reference.step(expected, g["w"])
        opt.step(p, foreign.asarray(g["w"]))
    np.testing.assert_allclose(foreign.to_numpy(p), expected, rtol=RTOL, atol=0)
    assert opt.t[id(p)] == reference.t[id(expected)] == STEPS
    np.testing.assert_allclose(
        foreign.to_numpy(opt.m[id(p)]), reference.m[id(expected)], rtol=RTOL, atol=0
    )


# -------------------------------------------------------------------------------------------------
# Errors.


def test_mixing_libraries_in_one_call_names_the_path(foreign: Library) -> None:
    with foreign.precise():
        mixed = {"a": foreign.asarray(np.ones(2)), "b": np.ones(2)}
        same = {"a": foreign.asarray(np.ones(2)), "b": foreign.asarray(np.ones(2))}
        lib = foreign.name
        article = "an" if lib[0] in "aeiou" else "a"
        expected = (
            rf"^params\['b'\]: expected {article} {lib} array like params\['a'\], got a NumPy "
            "array; one call takes the arrays of one library$"
        )
        with pytest.raises(TypeError, match=expected):
            adam_init(mixed)
        numpy_state = adam_init({"a": np.ones(2), "b": np.ones(2)})
        with pytest.raises(TypeError, match=expected):
            adam_update(mixed, same, numpy_state, AdamConfig())
        with pytest.raises(
            TypeError,
            match=rf"^grads\['b'\]: expected {article} {lib} array like params, got a NumPy "
            "array; one call takes the arrays of one library$",
        ):
            adam_update(same, mixed, adam_init(same), AdamConfig())


def test_mixing_two_other_libraries_names_the_path() -> None:
    first, second = load_library("array_api_strict"), load_library("torch")
    params = {"a": first.asarray(np.ones(2)), "b": second.asarray(np.ones(2))}
    with pytest.raises(
        TypeError,
        match=r"^params\['b'\]: expected an array_api_strict array like params\['a'\], got "
        "a torch Tensor; one call takes the arrays of one library$",
    ):
        adam_init(params)


def test_without_array_api_compat_the_error_names_the_extra(
    foreign: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    with foreign.precise():
        p = {"w": foreign.asarray(np.ones(3))}
        state = adam_init(p)
        kind = type(p["w"]).__name__
        monkeypatch.setitem(sys.modules, "array_api_compat", None)  # import raises ImportError
        expected = (
            rf"^params\['w'\]: got a {foreign.name} array \({kind}\); arrays of libraries other "
            r'than NumPy need array-api-compat: pip install "adam-functional\[array-api\]"$'
        )
        with pytest.raises(TypeError, match=expected):
            adam_init(p)
        with pytest.raises(TypeError, match=r"need array-api-compat: pip install"):
            adam_update(p, p, state, AdamConfig())
        with pytest.raises(TypeError, match=expected):
            af.Adam().step(p, p)


def test_the_extra_named_in_the_error_exists() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    from adam_functional._arrays import EXTRA

    extra = EXTRA.partition("[")[2].partition("]")[0]
    assert extra == "array-api"
    with (ROOT / "pyproject.toml").open("rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    assert any(req.startswith("array-api-compat") for req in extras.get(extra, []))
