"""JAX: adam_update under jax.jit, lax.scan and vmap, sharded arrays, and the errors of tracing.

The state of JAX parameters holds its counts as 0-d integer arrays, so that the step count is
data and one trace serves every step. float64 runs enable x64 with the ``jax.enable_x64(True)``
context manager, never globally (other test files use JAX in float32).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
from test_array_api import (
    CASES,
    NAN_STEP,
    RTOL,
    STEPS,
    assert_matches,
    load_library,
    numpy_run,
    problem,
    tree_map,
    under_jit,
)

import adam_functional as af
from adam_functional import AdamConfig, adam_init, adam_update, schedules


@pytest.fixture(scope="module")
def jax() -> Any:
    pytest.importorskip(
        "array_api_compat",
        reason='array-api-compat is not installed: pip install "adam-functional[array-api]"',
    )
    return pytest.importorskip("jax", reason="jax is not installed")


@pytest.fixture(scope="module")
def lib(jax: Any) -> Any:
    return load_library("jax")


def jitted_update(jax: Any, config: Any) -> tuple[Any, list[int]]:
    """``jax.jit`` of adam_update with ``config`` fixed, and a list that counts its traces
    (Python-side calls of the traced function)."""
    traces: list[int] = []

    def update(params: Any, grads: Any, state: af.AdamState) -> Any:
        traces.append(1)
        return adam_update(params, grads, state, config)

    return jax.jit(update), traces


# -------------------------------------------------------------------------------------------------
# jax.jit: one trace for every step.


def test_counts_are_0d_arrays_of_the_default_int_dtype(jax: Any) -> None:
    jnp = jax.numpy
    state = adam_init({"w": jnp.ones(3)})
    for name in ("t", "skipped", "consecutive_skips"):
        count = getattr(state, name)
        assert isinstance(count, jax.Array) and count.shape == () and count.dtype == jnp.int32
        assert not count.weak_type
    with jax.enable_x64(True):
        assert adam_init({"w": jnp.ones(3)}).t.dtype == jnp.int64


def test_jit_traces_once_over_five_steps(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(lr=0.01, amsgrad=True, nonfinite="skip")
    update, traces = jitted_update(jax, config)
    params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    state = adam_init(params, config)
    for step in range(5):
        grads = {"w": jnp.full((3, 4), step + 1.0), "b": jnp.full(4, -1.0)}
        params, state = update(params, grads, state)
    assert len(traces) == 1
    assert int(state.t) == 5 and state.t.dtype == jnp.int32
    assert params["w"].dtype == state.m["w"].dtype == state.v_max["b"].dtype == jnp.float32


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=() if case == "everything" else pytest.mark.slow)
        for case in CASES
        if case != "schedule"
    ],
)
def test_jit_trajectory_equals_the_numpy_path(jax: Any, lib: Any, case: str) -> None:
    config, nan = CASES[case]
    config = under_jit(config)  # "raise" is a TypeError under jit: "skip" instead
    _assert_jit_run_matches(jax, lib, config, nan)  # the NaN step is skipped with where


def test_scan_over_steps_equals_the_numpy_loop(jax: Any, lib: Any) -> None:
    jnp = jax.numpy
    config, _ = CASES["everything"]
    params, grads = problem(nan=True)
    expected = numpy_run(params, grads, config)
    with jax.enable_x64(True):
        stacked = tree_map(lambda *gs: jnp.stack([jnp.asarray(g) for g in gs]), *grads)

        def body(carry: Any, g: Any) -> tuple[Any, None]:
            p, state = carry
            return adam_update(p, g, state, config), None

        p = tree_map(jnp.asarray, params)
        (p, state), _ = jax.lax.scan(body, (p, adam_init(p, config)), stacked)
        assert_matches(p, state, expected, lib, RTOL)
    assert expected[1].skipped == 1


@pytest.mark.slow  # a compilation of its own
def test_vmap_over_parameter_sets_equals_one_numpy_run_each(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(lr=0.05, amsgrad=True, nesterov=True, weight_decay=0.01, nonfinite="skip")
    rng = np.random.default_rng(3)
    params = rng.normal(size=(4, 6))
    grads = rng.normal(size=(STEPS, 4, 6))
    grads[NAN_STEP, 2, 1] = np.nan  # only the third set skips that step
    with jax.enable_x64(True):
        p = jnp.asarray(params)
        state = jax.vmap(lambda x: adam_init(x, config))(p)
        step = jax.jit(jax.vmap(lambda p, g, s: adam_update(p, g, s, config)))
        for g in grads:
            p, state = step(p, jnp.asarray(g), state)
        np.testing.assert_array_equal(np.asarray(state.t), [STEPS, STEPS, STEPS - 1, STEPS])
        np.testing.assert_array_equal(np.asarray(state.skipped), [0, 0, 1, 0])
        for i in range(4):
            expected_p, expected_state = numpy_run(params[i], list(grads[:, i]), config)
            np.testing.assert_allclose(np.asarray(p[i]), expected_p, rtol=RTOL, atol=0)
            np.testing.assert_allclose(
                np.asarray(state.v_max[i]), expected_state.v_max, rtol=RTOL, atol=0
            )


@pytest.mark.slow  # a compilation of its own
def test_a_schedule_of_jax_operations_traces(jax: Any, lib: Any) -> None:
    config = AdamConfig(lr=lambda t: 0.05 * 0.8**t, nonfinite="skip")
    _assert_jit_run_matches(jax, lib, config, nan=True)


def _assert_jit_run_matches(jax: Any, lib: Any, config: AdamConfig, nan: bool) -> None:
    """A jitted run over the problem equals the NumPy run, and traces once."""
    params, grads = problem(nan=nan)
    expected = numpy_run(params, grads, config)
    update, traces = jitted_update(jax, config)
    with jax.enable_x64(True):
        p = tree_map(lib.asarray, params)
        state = adam_init(p, config)
        for g in grads:
            p, state = update(p, tree_map(lib.asarray, g), state)
        assert_matches(p, state, expected, lib, RTOL)
    assert len(traces) == 1


BUILT_IN_SCHEDULES = {
    "Constant": schedules.Constant(0.01),
    "ExponentialDecay": schedules.ExponentialDecay(0.05, 0.5, 4),
    "CosineDecay": schedules.CosineDecay(0.05, 10),
    "LinearWarmup": schedules.LinearWarmup(0.05, 4),
    "warmup_cosine_decay": schedules.warmup_cosine_decay(0.05, 3, 10),
}


@pytest.mark.parametrize("name", list(BUILT_IN_SCHEDULES))
def test_built_in_schedules_trace(jax: Any, lib: Any, name: str) -> None:
    config = AdamConfig(lr=BUILT_IN_SCHEDULES[name], nonfinite="skip")
    _assert_jit_run_matches(jax, lib, config, nan=False)


@pytest.mark.slow  # eager JAX operations compile at their first use
def test_an_eager_step_keeps_the_counts_as_arrays(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(lr=0.1, nonfinite="skip")
    update, traces = jitted_update(jax, config)
    p = jnp.ones(3)
    state = adam_init(p, config)
    p, state = update(p, jnp.ones(3), state)
    p, state = adam_update(p, jnp.ones(3), state, config)  # eager
    assert all(
        isinstance(getattr(state, name), jax.Array)
        for name in ("t", "skipped", "consecutive_skips")
    )
    p, state = update(p, jnp.ones(3), state)
    assert len(traces) == 1


def test_the_state_is_a_pytree_and_the_config_has_no_leaves(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(lr=0.1, amsgrad=True)
    state = adam_init({"w": jnp.ones(3), "b": jnp.zeros(2)}, config)
    assert jax.tree.leaves(config) == []
    # m, v and v_max with two leaves each (dict keys sorted), and the three counts.
    assert len(jax.tree.leaves(state)) == 9
    doubled = jax.tree.map(lambda x: x + 1, state)
    assert type(doubled) is af.AdamState
    assert int(doubled.t) == 1 and float(doubled.v_max["w"][0]) == 1.0


# -------------------------------------------------------------------------------------------------
# What cannot be done under tracing.


def test_nonfinite_raise_under_jit_is_a_type_error_at_trace_time(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(lr=0.1)  # nonfinite="raise"
    params = {"w": jnp.ones(3)}
    update, traces = jitted_update(jax, config)
    with pytest.raises(
        TypeError,
        match=r"^params\['w'\]: nonfinite='raise' cannot raise inside a traced function "
        r"\(jax.jit, vmap, scan, torch.func.vmap\), where the values are not known; use "
        r"AdamConfig\(nonfinite='skip'\), which selects with where, or 'propagate'",
    ):
        update.trace(params, params, adam_init(params, config))  # tracing only, nothing runs
    assert len(traces) == 1


def test_max_consecutive_skips_under_jit_is_a_type_error(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(lr=0.1, nonfinite="skip", max_consecutive_skips=3)
    params = jnp.ones(3)
    update, _ = jitted_update(jax, config)
    with pytest.raises(
        TypeError,
        match=r"^params: max_consecutive_skips cannot be enforced on lazy arrays \(under "
        r"jax.jit or torch.func.vmap, or dask\); leave it None there",
    ):
        update(params, params, adam_init(params, config))


def test_the_eager_step_raises_on_a_nan_gradient(jax: Any) -> None:
    jnp = jax.numpy
    params = {"w": jnp.ones(3)}
    state = adam_init(params)
    with pytest.raises(FloatingPointError, match=r"^grads\['w'\]: expected finite gradients"):
        adam_update(params, {"w": jnp.array([1.0, jnp.nan, 0.0])}, state, AdamConfig())


# -------------------------------------------------------------------------------------------------
# Subprocesses: a fresh interpreter, for what depends on the order of imports or on XLA_FLAGS.


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **environment, "PYTHONPATH": root}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_sharded_parameters_keep_their_sharding(jax: Any) -> None:
    result = run_python(
        """
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec

        import adam_functional as af

        jax.config.update("jax_enable_x64", True)  # this process only: float64, to compare
        assert len(jax.devices()) == 2, jax.devices()
        sharding = NamedSharding(jax.make_mesh((2,), ("x",)), PartitionSpec("x", None))
        config = af.AdamConfig(lr=0.1, amsgrad=True, nonfinite="skip")
        params = {"w": jax.device_put(jnp.arange(32.0).reshape(4, 8), sharding)}
        state = af.adam_init(params, config)
        update = jax.jit(lambda p, g, s: af.adam_update(p, g, s, config))
        grads = {"w": jax.device_put(jnp.ones((4, 8)), sharding)}
        for _ in range(3):
            params, state = update(params, grads, state)
        for x in (params["w"], state.m["w"], state.v["w"], state.v_max["w"]):
            assert x.sharding.is_equivalent_to(sharding, 2), x.sharding
            assert len(x.addressable_shards) == 2
        assert int(state.t) == 3
        expected = np.arange(32.0).reshape(4, 8)
        expected_state = af.adam_init(expected, config)
        for _ in range(3):
            expected, expected_state = af.adam_update(
                expected, np.ones((4, 8)), expected_state, config
            )
        np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-12)
        print("kept")
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kept"


@pytest.mark.slow
def test_the_state_is_a_pytree_whatever_the_order_of_imports(jax: Any) -> None:
    result = run_python(
        """
        import numpy as np
        import adam_functional as af
        import jax
        import jax.numpy as jnp

        state = jax.tree.map(jnp.asarray, af.adam_init(np.ones(3, np.float32)))
        assert isinstance(state, af.AdamState) and isinstance(state.m, jax.Array)
        """
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["key", "float8_e4m3fn", "float4_e2m1fn"])
def test_arrays_without_numbers_to_compute_with_are_refused_by_name(
    jax: Any, lib: Any, kind: str
) -> None:
    if kind == "key":
        odd = jax.random.split(jax.random.key(0), 3)
        message = r"expected an array of numbers, got an array of PRNG keys \(dtype key<fry>\)"
    else:  # stored, but neither computed nor promoted with
        odd = jax.numpy.ones(3, getattr(jax.numpy, kind))
        message = rf"expected a floating-point dtype of 16 bits or more, got {kind}"
    p = jax.numpy.ones(3)
    for where, call in [
        ("params", lambda: adam_init(odd)),
        ("grads", lambda: adam_update(p, odd, adam_init(p), AdamConfig())),
        (r"AdamState\.m", lambda: af.AdamState(m=odd, v=odd, t=0)),
    ]:
        with pytest.raises(TypeError, match=rf"^{where}: {message}"):
            call()


def test_jit_with_the_params_and_state_donated_steps(jax: Any) -> None:
    # Each leaf of a state is its own buffer: donating the state donates each one once.
    jnp = jax.numpy
    config = AdamConfig(lr=0.1, nonfinite="skip")
    step = jax.jit(lambda p, g, s: adam_update(p, g, s, config), donate_argnums=(0, 2))
    params = {"w": jnp.ones(4, jnp.float32)}
    state = adam_init(params)
    counts = [state.t, state.skipped, state.consecutive_skips]
    assert len({id(count) for count in counts}) == 3
    for _ in range(3):
        params, state = step(params, {"w": jnp.full(4, 0.5, jnp.float32)}, state)
    expected, _ = numpy_run(np.ones(4, np.float32), [np.full(4, 0.5, np.float32)] * 3, config)
    np.testing.assert_allclose(np.asarray(params["w"]), expected, rtol=1e-6)
    assert int(state.t) == 3


def test_float16_moments_that_would_overflow_raise_as_on_numpy(jax: Any) -> None:
    jnp = jax.numpy
    config = AdamConfig(moment_dtype="float16")
    message = r"^grads: expected finite gradients, got 1000 values of 1000 for which a moment "
    message += r"would overflow its storage dtype float16"
    for p, g in [
        (np.ones(1000, np.float32), np.full(1000, 1e4, np.float32)),
        (jnp.ones(1000, jnp.float32), jnp.full(1000, 1e4, jnp.float32)),
    ]:
        state = adam_init(p, config)
        with pytest.raises(FloatingPointError, match=message):
            adam_update(p, g, state, config)
