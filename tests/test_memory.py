"""Memory: a step allocates no full-size temporary (measured with tracemalloc, never timed)."""

from __future__ import annotations

import importlib.util
import tracemalloc

import numpy as np
import pytest

from adam_functional import Adam, AdamConfig, adam_init, adam_update, kernels

MiB = 1 << 20
N = 1_000_000
BACKENDS = [name for name in kernels.BACKENDS if importlib.util.find_spec(name) is not None]


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
    """Each installed backend in turn: the NumPy one allocates its blocks' temporaries."""
    with kernels.use_backend(request.param):
        yield request.param


def _peak(function):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = function()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("config", [AdamConfig(), AdamConfig(amsgrad=True, weight_decay=0.1)])
def test_pure_update_allocates_its_outputs_and_at_most_a_mebibyte_more(config):
    rng = np.random.default_rng(0)
    params, grads = rng.standard_normal(N), rng.standard_normal(N)
    state = adam_init(params, config)
    params, state = adam_update(params, grads, state, config)  # compile or warm up first
    peak, (new, new_state) = _peak(lambda: adam_update(params, grads, state, config))
    outputs = new.nbytes + new_state.m.nbytes + new_state.v.nbytes
    outputs += 0 if new_state.v_max is None else new_state.v_max.nbytes
    assert peak - outputs <= MiB, f"{(peak - outputs) / MiB:.2f} MiB beyond the outputs"
    # A control on the measure, not on the package: tracemalloc must see NumPy's temporaries
    # (the notebook's arithmetic makes several full-size ones), or the bound above would hold
    # whatever adam_update allocates.
    notebook_peak, _ = _peak(lambda: params - 0.001 * (grads / 0.1) / (np.sqrt(grads**2) + 1e-8))
    assert notebook_peak - params.nbytes > MiB


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_step_allocates_at_most_a_mebibyte(dtype):
    rng = np.random.default_rng(1)
    W, g = rng.standard_normal(N).astype(dtype), rng.standard_normal(N).astype(dtype)
    opt = Adam(amsgrad=True)
    opt.step(W, g)
    peak, _ = _peak(lambda: opt.step(W, g))
    assert peak <= MiB, f"{peak / MiB:.2f} MiB"


def test_a_kept_state_does_not_keep_the_parameters_it_returned_alive():
    import gc
    import weakref

    from adam_functional import AdamConfig, adam_init, adam_update

    params = {"a": np.ones(5), "b": np.ones(7)}  # small leaves: one batch, one flat buffer
    state = adam_init(params)
    kept = []
    for _ in range(3):
        params, state = adam_update(params, {"a": np.ones(5), "b": np.ones(7)}, state, AdamConfig())
        kept.append(state)
    buffer = weakref.ref(params["a"].base)
    assert buffer() is not None
    del params
    gc.collect()
    assert buffer() is None  # the states kept hold their moments, not the parameters
