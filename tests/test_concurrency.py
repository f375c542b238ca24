"""Threads and long runs: concurrent steps give the sequential bits, huge step counts stay exact.

The arrays have 100k to 300k elements, enough that NumPy releases the GIL inside its ufuncs and
the compiled kernel (``nogil=True``) runs truly in parallel, so that a shared buffer or a global
would show up as differing numbers; those runs take seconds and are marked slow. Long runs are
simulated by setting ``t`` directly.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, localcontext

import numpy as np
import pytest

from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update, schedules

SIZES = [100_000, 150_000, 300_000]  # below and above the compiled kernel's parallel threshold
STEPS = 10


def _grads(seed, shape, dtype, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]


def _params(seed, size, dtype):
    rng = np.random.default_rng(10_000 + seed)
    return {"w": rng.standard_normal(size).astype(dtype), "b": rng.standard_normal(7).astype(dtype)}


def _tree_grads(seed, params):
    w = _grads(seed, params["w"].shape, params["w"].dtype)
    b = _grads(seed + 1, params["b"].shape, params["b"].dtype)
    return [{"w": gw, "b": gb} for gw, gb in zip(w, b)]


CONFIGS = [
    AdamConfig(lr=0.01),
    AdamConfig(lr=schedules.warmup_cosine_decay(0.05, 5, 20), amsgrad=True, weight_decay=0.01),
    AdamConfig(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
]
# Each worker: a config, a dtype (float16 and float32 with float64 gradients take the NumPy
# kernel, the others the compiled one where numba is installed) and an array size.
JOBS = [
    (CONFIGS[index % 3], dtype, SIZES[index % 3])
    for index, dtype in enumerate([np.float64, np.float32, np.float16, np.float64] * 2)
]


def _run_pure(index, jobs=JOBS):
    config, dtype, size = jobs[index]
    params = _params(index, size, dtype)
    state = adam_init(params, config)
    for grads in _tree_grads(index, params):
        params, state = adam_update(params, grads, state, config)
    return params, state


def _run_wrapper(index, jobs=JOBS, opt=None):
    config, dtype, size = jobs[index]
    params = _params(index, size, dtype)
    opt = Adam.from_config(config) if opt is None else opt
    for grads in _tree_grads(index, params):
        opt.step(params, grads)
    return params, opt


def _assert_bits(a, b):
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def _in_threads(function, count):
    """Runs function(i) for i < count, each in its own thread, all started together."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def work(index):
        try:
            barrier.wait()
            results[index] = function(index)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def sequential():
    """The results of every job run alone, one after the other."""
    return [_run_pure(index) for index in range(len(JOBS))]


@pytest.mark.slow
def test_adam_update_from_many_threads_gives_the_sequential_bits(sequential):
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(_run_pure, range(len(JOBS))))
    for (params, state), (expected, expected_state) in zip(results, sequential):
        _assert_bits(params, expected)
        assert state == expected_state and state.t == STEPS


@pytest.mark.slow
def test_one_adam_per_thread_gives_the_sequential_bits(sequential):
    results = _in_threads(_run_wrapper, len(JOBS))
    for (params, opt), (expected, expected_state) in zip(results, sequential):
        _assert_bits(params, expected)
        state = opt.get_state(params["w"])
        assert state.t == STEPS and np.array_equal(state.v, expected_state.v["w"])


@pytest.mark.slow
def test_one_shared_adam_with_distinct_arrays_per_thread_gives_the_sequential_bits():
    # One config for all, so that one optimizer can serve every thread.
    jobs = [(CONFIGS[1], dtype, size) for _, dtype, size in JOBS]
    alone = [_run_wrapper(index, jobs)[0] for index in range(len(jobs))]
    shared = Adam.from_config(CONFIGS[1])
    results = _in_threads(lambda index: _run_wrapper(index, jobs, shared), len(jobs))
    for (params, _), expected in zip(results, alone):
        _assert_bits(params, expected)
        assert shared.t[id(params["w"])] == shared.t[id(params["b"])] == STEPS
    assert len(shared.t) == 2 * len(jobs)


@pytest.mark.slow
def test_one_shared_adam_stepping_one_array_per_thread_keeps_each_state_apart():
    # The same arrays are never stepped by two threads; each thread owns one leaf of a shared
    # optimizer, and reads back only its own state while the others keep stepping.
    opt = Adam(lr=0.01, amsgrad=True)
    leaves = [np.random.default_rng(i).standard_normal(120_000) for i in range(6)]
    copies = [leaf.copy() for leaf in leaves]

    def work(index):
        for g in _grads(index, leaves[index].shape, np.float64):
            opt.step(leaves[index], g)
            assert opt.get_state(leaves[index]).t <= STEPS
        return opt.get_state(leaves[index])

    states = _in_threads(work, len(leaves))
    for index, (copy, state) in enumerate(zip(copies, states)):
        alone = Adam(lr=0.01, amsgrad=True)
        for g in _grads(index, copy.shape, np.float64):
            alone.step(copy, g)
        assert copy.tobytes() == leaves[index].tobytes()
        assert state.t == STEPS and state == alone.get_state(copy)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
def test_concurrent_large_updates_survive_numbas_workqueue_threading_layer():
    # numba's default threading layer where neither TBB nor OpenMP is available is "workqueue",
    # which is not thread-safe: two threads entering a parallel=True kernel at once abort the
    # whole process. Arrays above the parallel threshold, stepped from several threads, must
    # still give results.
    script = textwrap.dedent(
        """
        from concurrent.futures import ThreadPoolExecutor
        import numpy as np
        import adam_functional as af

        assert af.backend() == "numba"
        config = af.AdamConfig(lr=0.01)

        def run(seed):
            rng = np.random.default_rng(seed)
            params = rng.standard_normal(300_000)
            state = af.adam_init(params)
            for _ in range(4):
                params, state = af.adam_update(params, rng.standard_normal(300_000), state, config)
            return float(params.sum())

        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(run, range(12)))
        assert concurrent == [run(seed) for seed in range(12)], "threads changed the results"
        """
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "ADAM_FUNCTIONAL_BACKEND": "numba"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _layer_available(layer):
    if layer == "default":
        return True
    module = {"tbb": "tbbpool", "omp": "omppool", "workqueue": "workqueue"}[layer]
    try:
        importlib.import_module(f"numba.np.ufunc.{module}")
    except ImportError:  # TBB's library, say, is not installed
        return False
    return True


_FORK_AND_THREADS = textwrap.dedent(
    """
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import adam_functional as af
    from adam_functional.kernels import numba as kernel

    N = kernel.PARALLEL_THRESHOLD
    config = af.AdamConfig(lr=0.01)

    def run(seed):
        rng = np.random.default_rng(seed)
        params = rng.standard_normal(N)
        state = af.adam_init(params)
        for _ in range(2):
            params, state = af.adam_update(params, rng.standard_normal(N), state, config)
        return params.tobytes()

    def on_threads():
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(run, range(4)))

    # Large steps: the parallel loops start the threading layer's threads.
    expected = [run(seed) for seed in range(4)]
    assert on_threads() == expected, "threads changed the results"

    def child(depth):
        # Exit status 1 if the steps differ, -15 if numba ends the child with SIGTERM (or -9
        # if it hangs and is killed).
        assert run(0) == expected[0] and on_threads() == expected, "the child's steps differ"
        if depth:
            grandchild = context.Process(target=child, args=(depth - 1,))
            grandchild.start()
            grandchild.join(timeout=20)
            if grandchild.exitcode is None:  # hung: it would hold this child at its exit
                grandchild.kill()
            assert grandchild.exitcode == 0, f"the grandchild's exit status: {grandchild.exitcode}"

    context = multiprocessing.get_context("fork")
    with ThreadPoolExecutor(2) as pool:
        # The parent steps on threads while it forks (an OpenMP team may be at work).
        busy = [pool.submit(run, seed) for seed in range(2)]
        process = context.Process(target=child, args=(1,))
        process.start()
        process.join(timeout=30)
        if process.exitcode is None:
            process.kill()
        assert [future.result() for future in busy] == expected[:2]
    assert process.exitcode == 0, f"the forked child's exit status: {process.exitcode}"
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="needs numba")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize(
    "layer",
    [
        "default",
        pytest.param("omp", marks=pytest.mark.slow),
        pytest.param("workqueue", marks=pytest.mark.slow),
        pytest.param("tbb", marks=pytest.mark.slow),
    ],
)
def test_a_forked_child_and_a_thread_pool_take_large_steps_after_large_steps(layer):
    # GNU OpenMP's threads, once started, cannot start again in a forked child: numba ends a
    # child that enters parallel code with SIGTERM. The child must take its steps (on the
    # serial loops there), alone and on threads, with the parent's bits. In a subprocess with a
    # timeout, so that a signal or a hang fails this test and not the run.
    if not _layer_available(layer):
        pytest.skip(f"numba's {layer} threading layer is not available")
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "ADAM_FUNCTIONAL_BACKEND": "numba"}
    result = subprocess.run(
        [sys.executable, "-c", _FORK_AND_THREADS],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # (numba's TBB layer may print that it could not join its threads before the fork.)
    assert result.stdout.splitlines()[-1:] == ["ok"], result.stdout[-2000:]


def test_steps_from_many_threads_claim_each_restored_state_once():
    # Restored states wait for the arrays that step first; 64 arrays stepping from 8 threads at
    # once must each take one, none twice, none left over.
    source = Adam(lr=0.01)
    arrays = [np.full(3, float(i)) for i in range(64)]
    for a in arrays:
        source.step(a, np.ones(3))
    target = Adam()
    target.load_state_dict(source.state_dict())
    assert "pending=64" in repr(target)
    fresh = [np.zeros(3) for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda x: target.step(x, np.ones(3)), fresh))
    assert sorted(target.t[id(x)] for x in fresh) == [2] * 64
    assert "pending" not in repr(target)
    late = np.zeros(3)
    target.step(late, np.ones(3))
    assert target.t[id(late)] == 1, "an array after the 64 starts fresh"


@pytest.mark.slow
def test_snapshots_taken_while_another_thread_steps_hold_whole_steps():
    # With a constant gradient every element of m and v takes the same values, step after step:
    # a snapshot taken half-way through a step would hold two values, or a t from another step.
    W, g = np.zeros(1_000_000), np.ones(1_000_000)
    opt = Adam(lr=0.01)
    opt.step(W, g)
    stop = threading.Event()
    errors: list = []

    def step():
        try:
            while not stop.is_set():
                opt.step(W, g)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    snapshots = []
    thread = threading.Thread(target=step)
    thread.start()
    try:
        for _ in range(5):
            snapshots.append(opt.state_dict()["state"][0])
            snapshots.append(pickle.loads(pickle.dumps(opt)).state_dict()["state"][0])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    # What m[0] and v[0] are after t steps, from one element stepped alone.
    one, alone = np.zeros(1), Adam(lr=0.01)
    expected = {}
    for t in range(1, max(entry["t"] for entry in snapshots) + 1):
        alone.step(one, np.ones(1))
        expected[t] = (alone.m[id(one)][0], alone.v[id(one)][0])
    for entry in snapshots:
        m, v = expected[entry["t"]]
        assert entry["m"].min() == entry["m"].max() == m, entry["t"]
        assert entry["v"].min() == entry["v"].max() == v, entry["t"]


# -------------------------------------------------------------------------------------------------
# Long runs: the step count is an exact Python int, and the bias corrections follow it.


def _bias_correction(beta, t):
    """1 - beta**t to 50 digits, rounded to the nearest float."""
    with localcontext() as context:
        context.prec = 60
        exact = 1 - Decimal(beta) ** t
        return float(exact)


@pytest.mark.parametrize("t", [2**24, 2**31, 2**40, 2**53, 2**64])
@pytest.mark.parametrize("beta2", [0.999, 1 - 2**-40])
def test_huge_step_counts_stay_exact_and_bias_corrections_follow_them(t, beta2):
    config = AdamConfig(lr=0.1, beta1=0.9, beta2=beta2, eps=1e-12)
    m, v = np.array([0.3, -0.02]), np.array([0.04, 1e-6])
    params, grads = np.array([1.0, 2.0]), np.array([0.5, -0.1])
    state = AdamState(m=m, v=v, t=t)
    new, after = adam_update(params, grads, state, config)
    assert after.t == t + 1 and type(after.t) is int
    # The same step with bias corrections from 60-digit arithmetic.
    bc1, bc2 = _bias_correction(0.9, t + 1), _bias_correction(beta2, t + 1)
    m_new = m * 0.9 + grads * (1 - 0.9)
    v_new = v * beta2 + (grads * grads) * (1 - beta2)
    expected = params - ((m_new / bc1) * 0.1) / (np.sqrt(v_new / bc2) + 1e-12)
    # 1 - beta2**t is computed in float64 from beta2**t: for beta2 near 1 and t where
    # beta2**t is near 1 too, that costs up to ~1e-11 relative (the pow's rounding, divided by
    # the small difference); everywhere else it is exact to the last bits.
    step = np.abs(expected - params)
    atol = float(np.max(step)) * 1e-10
    np.testing.assert_allclose(new, expected, rtol=0, atol=atol)
    if bc2 < 0.99:
        # Where the correction matters, the step uses it: taken as 1, as a count rounded far
        # past the true one would give, the step would differ by far more than the tolerance.
        uncorrected = params - ((m_new / bc1) * 0.1) / (np.sqrt(v_new) + 1e-12)
        assert np.min(np.abs(new - uncorrected)) > 1e6 * atol


def test_the_count_keeps_counting_past_float64_precision():
    # A float64 counter stalls at 2**53 (2**53 + 1 == 2**53); a Python int does not.
    params = np.array([1.0])
    config = AdamConfig(lr=1e-3)
    state = AdamState(m=np.zeros(1), v=np.zeros(1), t=2**53 - 2)
    for _ in range(4):
        params, state = adam_update(params, np.array([0.5]), state, config)
    assert state.t == 2**53 + 2 and type(state.t) is int
    opt = Adam(lr=1e-3)
    W = np.ones(1)
    opt.load_state_dict(
        {
            "format": "adam_functional.Adam",
            "version": 1,
            "config": {
                "lr": 1e-3,
                "beta1": 0.9,
                "beta2": 0.999,
                "eps": 1e-8,
                "weight_decay": 0.0,
                "decoupled_weight_decay": False,
                "amsgrad": False,
                "maximize": False,
                "nonfinite": "raise",
            },
            "state": [
                {
                    "m": np.zeros(1),
                    "v": np.zeros(1),
                    "t": 2**64,
                    "skipped": 0,
                    "consecutive_skips": 0,
                }
            ],
        }
    )
    for _ in range(3):
        opt.step(W, np.array([0.5]))
    assert opt.t[id(W)] == 2**64 + 3 and type(opt.t[id(W)]) is int


def test_counts_just_past_float32_precision_give_different_steps():
    # float32 cannot tell 2**24 from 2**24 + 1; with beta2 = 1 - 2**-40 the bias correction
    # at those counts is ~1.5e-5 and its last bits depend on the exact count.
    config = AdamConfig(lr=1.0, beta1=0.0, beta2=1 - 2**-40)
    results = []
    for t in (2**24, 2**24 + 1, 2**24 + 2):
        state = AdamState(m=np.zeros(1), v=np.array([1.0]), t=t)
        new, _ = adam_update(np.array([1.0]), np.array([1.0]), state, config)
        results.append(new[0])
    assert len(set(results)) == 3
