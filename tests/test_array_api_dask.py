"""dask: adam_update builds a lazy graph; a cluster of worker processes runs it.

With ``nonfinite="skip"`` or ``"propagate"`` a call computes nothing: the tests prove it by
running the call under a scheduler that raises. With ``"raise"`` the finiteness check is
computed in the call, since the call must raise or not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from test_array_api import (
    CASES,
    NAN_STEP,
    RTOL,
    assert_matches,
    load_library,
    numpy_run,
    problem,
    tree_map,
)

import adam_functional as af
from adam_functional import AdamConfig, adam_init, adam_update, schedules

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lib() -> Any:
    return load_library("dask")  # skips without dask or array-api-compat


class Computed(Exception):
    """Raised by a scheduler that must not be called."""


@contextlib.contextmanager
def counting_scheduler(*, refuse: bool) -> Iterator[list[Any]]:
    """Makes dask compute with a scheduler that records each call (and raises, with
    ``refuse``); yields the list of calls."""
    import dask

    calls: list[Any] = []

    def scheduler(graph: Any, keys: Any, **kwargs: Any) -> Any:
        calls.append(keys)
        if refuse:
            raise Computed(f"computed {keys!r}")
        return dask.get(graph, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield calls


@pytest.mark.parametrize("nonfinite", ["skip", pytest.param("propagate", marks=pytest.mark.slow)])
def test_nothing_is_computed_in_the_call(lib: Any, nonfinite: str) -> None:
    config, _ = CASES["everything"]
    config = tree_map(lambda c: attrs.evolve(c, nonfinite=nonfinite), config)
    params, grads = problem(nan=True)
    grads = grads[: NAN_STEP + 2]  # the steps up to the NaN and one after; all 12 are slow tests
    expected = numpy_run(params, grads, config)
    p = tree_map(lib.asarray, params)
    state = adam_init(p, config)
    for g in grads:
        with counting_scheduler(refuse=True) as calls:
            p, state = adam_update(p, tree_map(lib.asarray, g), state, config)
        assert calls == []
        p, state = lib.settle(p, state)  # computes, outside the call
    assert_matches(p, state, expected, lib, RTOL)


def test_skip_makes_the_counts_lazy(lib: Any) -> None:
    import dask
    import dask.array as da

    config = AdamConfig(lr=0.1, nonfinite="skip")
    g = np.ones(6)
    g[1] = np.nan
    p = da.from_array(np.zeros(6), chunks=3)
    state = adam_init(p, config)
    with counting_scheduler(refuse=True):
        p, state = adam_update(p, da.from_array(g, chunks=3), state, config)
        p, state = adam_update(p, da.ones(6, chunks=3), state, config)
    for name in ("t", "skipped", "consecutive_skips"):
        count = getattr(state, name)
        assert isinstance(count, da.Array) and count.shape == (), name
    values = dask.compute(p, state.t, state.skipped, state.consecutive_skips)
    expected, expected_state = numpy_run(np.zeros(6), [g, np.ones(6)], config)
    np.testing.assert_allclose(values[0], expected, rtol=RTOL, atol=0)
    assert values[1:] == (expected_state.t, expected_state.skipped, 0) == (1, 1, 0)


def test_raise_computes_the_check_in_the_call(lib: Any) -> None:
    config = AdamConfig(lr=0.1)
    p = lib.asarray(np.linspace(-1, 1, 6))
    state = adam_init(p, config)
    with counting_scheduler(refuse=False) as calls:
        new_p, new_state = adam_update(p, lib.asarray(np.ones(6)), state, config)
    assert len(calls) == 1  # the finiteness check, and nothing else
    assert new_state.t == 1
    g = np.ones(6)
    g[4] = np.inf
    # The check fails in the call; the diagnosis then names the value, as on NumPy arrays.
    message = r"^grads: expected finite gradients, got 1 NaN or infinite value of 6 \(first at"
    with pytest.raises(FloatingPointError, match=message):
        adam_update(new_p, lib.asarray(g), new_state, config)


def test_max_consecutive_skips_is_a_type_error_on_dask(lib: Any) -> None:
    config = AdamConfig(lr=0.1, nonfinite="skip", max_consecutive_skips=2)
    p = lib.asarray(np.ones(4))
    with pytest.raises(
        TypeError,
        match=r"^params: max_consecutive_skips cannot be enforced on lazy arrays \(under "
        r"jax.jit or torch.func.vmap, or dask\); leave it None there$",
    ):
        adam_update(p, p, adam_init(p, config), config)


def test_a_built_in_schedule_with_skip(lib: Any) -> None:
    config = AdamConfig(lr=schedules.warmup_cosine_decay(0.05, 3, 10), nonfinite="skip")
    params, grads = problem(nan=True)
    expected = numpy_run(params, grads, config)
    p = tree_map(lib.asarray, params)
    state = adam_init(p, config)
    for g in grads:
        p, state = lib.settle(*adam_update(p, tree_map(lib.asarray, g), state, config))
    assert_matches(p, state, expected, lib, RTOL)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="dask.persist and dask.compute look into lists, tuples, dicts and dataclasses, not "
    "into an attrs AdamState: dask.persist(state) returns the state as it is, unpersisted",
)
def test_dask_persist_takes_a_state(lib: Any) -> None:
    import dask

    config = AdamConfig(lr=0.1, nonfinite="skip")
    p = lib.asarray(np.ones(4))
    _, state = adam_update(p, p, adam_init(p, config), config)
    (persisted,) = dask.persist(state)
    assert persisted is not state
    assert len(persisted.m.__dask_graph__()) == len(persisted.m.chunks[0])


# -------------------------------------------------------------------------------------------------
# A cluster of worker processes.


@pytest.mark.slow
def test_training_on_a_local_cluster_equals_numpy(lib: Any) -> None:
    import dask
    import dask.array as da

    distributed = pytest.importorskip("distributed", reason="distributed is not installed")
    config = AdamConfig(lr=0.05, amsgrad=True, nonfinite="skip")
    rng = np.random.default_rng(11)
    target = rng.normal(size=40)
    scale = rng.uniform(0.5, 2.0, size=40)
    x0 = np.zeros(40)
    steps = 6

    def gradient(x: Any) -> Any:  # elementwise: the same numbers for NumPy and dask
        return scale * (x - target)

    x_np, state_np = x0, adam_init(x0, config)
    for _ in range(steps):
        x_np, state_np = adam_update(x_np, gradient(x_np), state_np, config)
    expected = (x_np, state_np)

    with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        x = da.from_array(x0, chunks=10)
        state = adam_init(x, config)
        for _ in range(steps):
            x, state = adam_update(x, gradient(x), state, config)
            x, fields = dask.persist(x, attrs.asdict(state, recurse=False))
            state = af.AdamState(**fields)
        distributed.wait(x)
        assert len(x.__dask_graph__()) == 4  # persisted: one task per chunk, held by workers
        held = {key for keys in client.has_what().values() for key in keys}
        assert {str(key) for key in x.__dask_keys__()} <= {str(key) for key in held}
        x_values, v_max = dask.compute(x, state.v_max)
        counts = [int(c) for c in dask.compute(state.t, state.skipped)]
    np.testing.assert_allclose(x_values, expected[0], rtol=RTOL, atol=0)
    np.testing.assert_allclose(v_max, expected[1].v_max, rtol=RTOL, atol=0)
    assert counts == [steps, 0]


@pytest.mark.slow
def test_the_cluster_example_runs() -> None:
    pytest.importorskip("distributed", reason="distributed is not installed")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dask_cluster.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step ")]
    assert len(losses) == 10 and losses[-1] < 0.6 * losses[0]
    assert lines[-1].startswith("matches the same steps on NumPy")


def test_arrays_of_unknown_shape_are_refused_by_name(lib: Any) -> None:
    known = lib.asarray(np.ones(4))
    unknown = known[known > 0]  # shape (nan,) until computed
    calls = {
        "params": lambda: adam_init(unknown),
        "grads": lambda: adam_update(known, unknown, adam_init(known), AdamConfig()),
        r"AdamState\.m": lambda: af.AdamState(m=unknown, v=unknown, t=0),
    }
    message = r"expected an array of known shape, got a dask array of shape \(nan,\)"
    for where, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{where}: {message}"):
            call()
