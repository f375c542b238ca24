"""Every way into a step goes through one planner's structural check and one step's value check.

The planner (``adam_functional._plan``) checks the structure of a step: `build` when it plans,
`guard` when it takes a kept plan again. The step (``adam_functional._step``) checks the values:
`check_values`, once per call. This test wraps the three and takes every route there is, first
and later steps: a speed-up that adds a path around them fails here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from adam_functional import (
    Adam,
    AdamConfig,
    _plan,
    _step,
    _update,
    _wrapper,
    adam_init,
    adam_update,
    schedules,
)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"structure": 0, "values": 0}

    def counted(function: Any, kind: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[kind] += 1
            return function(*args, **kwargs)

        return wrapper

    build = counted(_plan.build, "structure")
    for module in (_plan, _update, _wrapper):
        monkeypatch.setattr(module, "build", build)
    monkeypatch.setattr(_plan, "guard", counted(_plan.guard, "structure"))
    monkeypatch.setattr(_step, "check_values", counted(_step.check_values, "values"))
    return counts


def _numpy_cases() -> list[tuple[str, Any, AdamConfig]]:
    rng = np.random.default_rng(0)
    return [
        ("2x2 float64", rng.standard_normal((2, 2)), AdamConfig(lr=0.1)),
        ("2x2 float32", rng.standard_normal((2, 2)).astype(np.float32), AdamConfig(lr=0.1)),
        ("1000", rng.standard_normal(1000), AdamConfig()),
        ("100000", rng.standard_normal(100_000), AdamConfig()),
        ("batches", {f"l{i}": rng.standard_normal(7) for i in range(5)}, AdamConfig()),
        ("schedule", rng.standard_normal(10), AdamConfig(lr=schedules.CosineDecay(0.1, 10))),
        ("amsgrad", rng.standard_normal(10), AdamConfig(amsgrad=True)),
        (
            "L2",
            {"a": rng.standard_normal(6), "b": rng.standard_normal(6)},
            AdamConfig(weight_decay=0.1),
        ),
    ]


def _take_routes(params: Any, config: Any, calls: dict[str, int], in_place: bool) -> None:
    def grads_like(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {key: grads_like(value) for key, value in tree.items()}
        return tree * 0 + 0.5

    state = adam_init(params, config)
    opt = Adam.from_config(config if isinstance(config, AdamConfig) else AdamConfig())
    for step in range(3):  # the first step plans, the later ones take a kept plan or plan again
        before = dict(calls)
        params, state = adam_update(params, grads_like(params), state, config)
        assert calls["structure"] > before["structure"], f"adam_update, step {step + 1}"
        assert calls["values"] == before["values"] + 1, f"adam_update, step {step + 1}"
        if in_place:
            before = dict(calls)
            step_config = None if isinstance(config, AdamConfig) else config
            opt.step(params, grads_like(params), config=step_config)
            assert calls["structure"] > before["structure"], f"Adam.step, step {step + 1}"
            assert calls["values"] == before["values"] + 1, f"Adam.step, step {step + 1}"


@pytest.mark.parametrize("case", _numpy_cases(), ids=lambda case: case[0])
def test_every_numpy_route_runs_both_checks(calls: dict[str, int], case: Any) -> None:
    _, params, config = case
    params = (
        {key: value.copy() for key, value in params.items()}
        if isinstance(params, dict)
        else params.copy()
    )
    _take_routes(params, config, calls, in_place=True)


def test_a_config_tree_runs_both_checks(calls: dict[str, int]) -> None:
    params = {"w": np.ones(4), "b": np.zeros(2)}
    config = {"w": AdamConfig(weight_decay=0.1, decoupled_weight_decay=True), "b": AdamConfig()}
    _take_routes(params, config, calls, in_place=True)


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not _has("torch") or not _has("array_api_compat"), reason="needs torch")
def test_torch_cpu_tensors_run_both_checks(calls: dict[str, int]) -> None:
    import torch

    _take_routes({"w": torch.ones(3, 2, dtype=torch.float64)}, AdamConfig(), calls, in_place=True)


@pytest.mark.skipif(not _has("jax") or not _has("array_api_compat"), reason="needs jax")
def test_jax_eager_and_jit_run_both_checks(calls: dict[str, int]) -> None:
    import jax
    import jax.numpy as jnp

    config = AdamConfig(nonfinite="skip")
    _take_routes({"w": jnp.ones(4)}, config, calls, in_place=False)
    step = jax.jit(lambda p, g, s: adam_update(p, g, s, config))
    params = {"w": jnp.ones(4)}
    state = adam_init(params)
    before = dict(calls)
    step(params, params, state)  # traced once: both checks run in the trace
    assert calls["structure"] > before["structure"]
    assert calls["values"] == before["values"] + 1


@pytest.mark.skipif(not _has("array_api_strict") or not _has("array_api_compat"), reason="needs it")
def test_array_api_strict_runs_both_checks(calls: dict[str, int]) -> None:
    import array_api_strict as xp

    _take_routes({"w": xp.ones(4, dtype=xp.float64)}, AdamConfig(), calls, in_place=False)


@pytest.mark.skipif(not _has("dask") or not _has("array_api_compat"), reason="needs dask")
def test_dask_runs_both_checks(calls: dict[str, int]) -> None:
    import dask.array as da

    _take_routes({"w": da.ones(4, chunks=2)}, AdamConfig(), calls, in_place=False)
