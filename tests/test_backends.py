"""Every backend and both memory policies give bit-for-bit the results of the NumPy kernel."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from adam_functional import Adam, AdamConfig, AdamState, adam_init, adam_update, backend, kernels
from adam_functional.kernels import Inputs, Outputs
from adam_functional.kernels import numpy as reference

BACKENDS = ["numpy"]
try:
    from adam_functional.kernels import numba as _numba

    BACKENDS.append("numba")
except ImportError:  # the optional extra is not installed
    _numba = None

CONFIGS = [
    AdamConfig(lr=0.01),
    AdamConfig(lr=0.01, weight_decay=0.1),
    AdamConfig(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    AdamConfig(lr=0.01, amsgrad=True),
    AdamConfig(lr=0.01, maximize=True, weight_decay=0.05),
    AdamConfig(lr=0.3, beta1=0.0, beta2=0.5, eps=0.0, amsgrad=True, maximize=True),
    AdamConfig(lr=0.01, nesterov=True),
    AdamConfig(lr=0.01, nesterov=True, eps_root=1e-6, amsgrad=True, weight_decay=0.1),
    AdamConfig(lr=0.01, eps_root=1e-3, decoupled_weight_decay=True, weight_decay=0.1),
]
B = reference.BLOCK_SIZE
SIZES = [0, 1, 7, B - 1, B, B + 1, 3 * B + 5]


def _kernel(name, p, g, m):
    """The kernel that backend ``name`` gives these dtypes (the reference's where it has none)."""
    with kernels.use_backend(name):
        return kernels.select(p.dtype, g.dtype, m.dtype)


def _case(rng, n, dtype, config, t):
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    m = (0.1 * rng.standard_normal(n)).astype(dtype)
    v = np.abs(0.1 * rng.standard_normal(n)).astype(dtype)
    v_max = (v + np.abs(rng.standard_normal(n)) * (rng.random(n) < 0.5)).astype(dtype)
    return p, g, m, v, (v_max if config.amsgrad else None), kernels.coefficients(config, t)


def _fresh(p, v_max):
    outs = [np.empty_like(p) for _ in range(3)]
    return [*outs, None if v_max is None else np.empty_like(p)]


def _assert_same(a, b):
    for x, y in zip(a, b):
        if x is None:
            assert y is None
            continue
        assert x.dtype == y.dtype
        # NaN is NaN: its sign and payload depend on the instruction that made it.
        nan = np.isnan(x)
        np.testing.assert_array_equal(nan, np.isnan(y))
        assert x[~nan].tobytes() == y[~nan].tobytes(), "results differ in their bits"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [pytest.param(np.float16, marks=pytest.mark.slow), np.float32, np.float64]
)
@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
# Bias corrections < 1, then one, then both 1.0 (the later two with the slow tests).
@pytest.mark.parametrize(
    "t",
    [3, pytest.param(1000, marks=pytest.mark.slow), pytest.param(10**6, marks=pytest.mark.slow)],
)
def test_backends_and_memory_policies_agree_bit_for_bit(name, dtype, config, t):
    rng = np.random.default_rng(0)
    for n in SIZES:
        p, g, m, v, v_max, c = _case(rng, n, dtype, config, t=t)
        expected = _fresh(p, v_max)
        reference.adam_leaf(Inputs(p, g, m, v, v_max), c, Outputs(*expected))
        fresh = _fresh(p, v_max)
        _kernel(name, p, g, m)(Inputs(p, g, m, v, v_max), c, Outputs(*fresh))
        _assert_same(expected, fresh)
        # In place (donation): outputs are the inputs.
        p2, m2, v2 = p.copy(), m.copy(), v.copy()
        vm2 = None if v_max is None else v_max.copy()
        _kernel(name, p, g, m)(Inputs(p2, g, m2, v2, vm2), c, Outputs(p2, m2, v2, vm2))
        _assert_same(expected, [p2, m2, v2, vm2])


@pytest.mark.skipif(
    _numba is None, reason="numba is not installed (pip install 'adam-functional[numba]')"
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_parallel_path_agrees(dtype):
    rng = np.random.default_rng(1)
    n = _numba.PARALLEL_THRESHOLD + 12345
    for config in (CONFIGS[0], CONFIGS[3], CONFIGS[2]):
        p, g, m, v, v_max, c = _case(rng, n, dtype, config, t=10**6)
        expected, got = _fresh(p, v_max), _fresh(p, v_max)
        reference.adam_leaf(Inputs(p, g, m, v, v_max), c, Outputs(*expected))
        _numba.adam_leaf(Inputs(p, g, m, v, v_max), c, Outputs(*got))
        _assert_same(expected, got)


@pytest.mark.parametrize("name", BACKENDS)
def test_special_values_agree(name):
    special = np.array([0.0, -0.0, 1e-310, -1e-310, 1e300, -1e300, np.nan, np.inf, -np.inf, 1.0])
    # More elements than the Python-float path takes: the arrays' own kernels run.
    values = np.tile(special, 2)
    assert values.size > reference.SCALAR_SIZE
    for p, g in itertools.product([values], [values, values[::-1].copy()]):
        for config in CONFIGS:
            m = np.abs(values[::-1]).copy()
            v = np.abs(values).copy()
            v_max = None
            if config.amsgrad:
                # Ties of -0.0 and +0.0: np.maximum gives its second argument, the new v.
                v_max = v.copy()
                v_max[:2] = [-0.0, -0.0]
            c = kernels.coefficients(config, 2)
            expected, got = _fresh(p, v_max), _fresh(p, v_max)
            with np.errstate(all="ignore"):
                reference.adam_leaf(Inputs(p, g, m, v, v_max), c, Outputs(*expected))
                _kernel(name, p, g, m)(Inputs(p, g, m, v, v_max), c, Outputs(*got))
            _assert_same(expected, got)


def test_pure_and_in_place_agree_on_non_contiguous_and_fortran_inputs():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((40, 30))
    layouts = {
        "strided": base[::2, ::3],
        "fortran": np.asfortranarray(base[:20, :10]),
        "negative": base[::-1, ::-2],
    }
    config = AdamConfig(lr=0.05, amsgrad=True)
    for layout, params in layouts.items():
        grads = rng.standard_normal(params.shape)
        contiguous = np.ascontiguousarray(params)
        a, sa = adam_update(params, grads, adam_init(params, config), config)
        b, sb = adam_update(
            contiguous, np.asfortranarray(grads), adam_init(contiguous, config), config
        )
        np.testing.assert_array_equal(a, b, err_msg=layout)
        assert sa == sb
        in_place = params.copy(order="K") if layout != "negative" else base.copy()[::-1, ::-2]
        Adam.from_config(config).step(in_place, grads)
        np.testing.assert_array_equal(in_place, a, err_msg=layout)


def test_backend_reports_the_active_one():
    assert backend() in ("numpy", "numba")
    if _numba is not None and not os.environ.get("ADAM_FUNCTIONAL_BACKEND"):
        assert backend() == "numba"


def _run_with(env_value, hide_numba=False):
    code = (
        "import sys\n"
        + ("sys.modules['numba'] = None\n" if hide_numba else "")
        + "import adam_functional, numpy\n"
        "print(adam_functional.backend())\n"
        "W = numpy.ones(3); adam_functional.Adam(lr=0.5, eps=0.0).step(W, numpy.ones(3)); print(W[0])\n"
    )
    env = {**os.environ, "ADAM_FUNCTIONAL_BACKEND": env_value}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )


def test_the_environment_variable_forces_numpy():
    result = _run_with("numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "0.5"]


def test_forcing_numba_without_it_is_a_clear_error():
    result = _run_with("numba", hide_numba=True)
    assert result.returncode != 0
    assert (
        "ImportError: ADAM_FUNCTIONAL_BACKEND=numba, but numba cannot be imported" in result.stderr
    )
    assert 'pip install "adam-functional[numba]"' in result.stderr


def test_an_unknown_backend_is_a_clear_error():
    result = _run_with("cuda")
    assert result.returncode != 0
    assert (
        "ValueError: ADAM_FUNCTIONAL_BACKEND: expected one of numpy, numba, got 'cuda'"
        in result.stderr
    )


@pytest.mark.skipif(
    _numba is None, reason="numba is not installed (pip install 'adam-functional[numba]')"
)
def test_the_environment_variable_forces_numba():
    result = _run_with("numba")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numba", "0.5"]


def _run_with_broken_numba(tmp_path, env_value):
    # A numba that is installed but breaks as it imports.
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise RuntimeError('a broken build')\n")
    code = (
        "import warnings, numpy\n"
        "import adam_functional\n"
        "from adam_functional import Adam, backend\n"
        "print(backend())\n"
        "W = numpy.ones(1 << 17)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    Adam(lr=0.5, eps=0.0).step(W, numpy.ones(1 << 17))\n"
        "print(backend(), W[0], [str(w.message) for w in caught])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "ADAM_FUNCTIONAL_BACKEND": env_value}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )


def test_a_numba_that_breaks_as_it_imports_is_refused_when_forced(tmp_path):
    result = _run_with_broken_numba(tmp_path, "numba")
    assert result.returncode != 0
    assert (
        "ImportError: ADAM_FUNCTIONAL_BACKEND=numba, but numba cannot be imported" in result.stderr
    )


def test_a_numba_that_breaks_as_it_imports_leaves_the_steps_to_numpy(tmp_path):
    result = _run_with_broken_numba(tmp_path, "")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "numba"  # Installed: chosen, and loaded at the first large step.
    assert second.startswith("numpy 0.5 [")
    assert "numba cannot be imported (a broken build); the NumPy kernels take the steps" in second


@pytest.mark.skipif(
    _numba is None, reason="numba is not installed (pip install 'adam-functional[numba]')"
)
def test_a_v_max_of_negative_zero_with_eps_of_negative_zero_agrees():
    # A forged state: v below zero and v_max -0.0, so that the denominator is sqrt(-0.0) - 0.0,
    # -0.0, and the step's infinity takes its sign from it in every backend alike.
    config = AdamConfig(lr=0.1, eps=-0.0, amsgrad=True, nonfinite="propagate")
    n = 40
    state = AdamState(m=np.ones(n), v=-np.ones(n), t=2, v_max=np.full(n, -0.0))
    results = []
    for name in BACKENDS:
        with kernels.use_backend(name):
            new, new_state = adam_update(np.ones(n), np.zeros(n), state, config)
        results.append((new, new_state.v_max))
    for got in results[1:]:
        _assert_same(results[0], got)
    # step / -0.0 is -inf, and p - (-inf) is +inf (a denominator of +0.0 would give -inf).
    assert np.all(results[0][0] == np.inf)


# Steps that make a NaN from one NaN and numbers, or from 0.0 / 0.0: its sign bit is made alike
# by every kernel (np.negative and Python's -g flip it, x86's 0.0 / 0.0 sets it).
NAN_STEPS = {
    "maximize with a NaN gradient": (
        AdamConfig(lr=0.1, maximize=True, nonfinite="propagate"),
        [np.nan, 1.0, -2.0, 3.0],
    ),
    "maximize with a -NaN gradient and L2": (
        AdamConfig(lr=0.1, maximize=True, weight_decay=0.1, nonfinite="propagate"),
        [-np.nan, 1.0, -2.0, 3.0],
    ),
    "0 / 0 with eps=0": (AdamConfig(lr=0.1, eps=0.0), [0.0, 1.0, -2.0, 3.0]),
    "0 / 0 with eps=0 and AMSGrad": (
        AdamConfig(lr=0.1, eps=0.0, amsgrad=True),
        [0.0, 1.0, 2.0, 3.0],
    ),
}


def _nan_step_results(config, grad, dtype):
    """The first parameters of a 4-element step through each API and path: one array and a tree
    of five such leaves (stepped as one batch), by `adam_update` and by `Adam.step`, and the
    array kernel on 40 elements (more than the Python-float loop takes)."""
    g = np.array(grad, dtype)
    p = np.array([1.0, 2.0, 3.0, 4.0], dtype)
    results = {"adam_update": adam_update(p, g, adam_init(p, config), config)[0]}
    in_place = p.copy()
    Adam.from_config(config).step(in_place, g)
    results["Adam.step"] = in_place
    tree = [p + i for i in range(5)]
    grads = [g.copy() for _ in tree]
    stepped, _ = adam_update(tree, grads, adam_init(tree, config), config)
    results["adam_update of a tree"] = stepped[0]
    Adam.from_config(config).step(tree, grads)
    results["Adam.step of a tree"] = tree[0]
    big_p, big_g = np.tile(p, 10), np.tile(g, 10)
    zeros = np.zeros_like(big_p)
    out = _fresh(big_p, zeros if config.amsgrad else None)
    x = Inputs(big_p, big_g, zeros, zeros, zeros if config.amsgrad else None)
    with np.errstate(all="ignore"):
        kernels.select(p.dtype, g.dtype, p.dtype)(x, kernels.coefficients(config, 1), Outputs(*out))
    results["the array kernel"] = out[0][:4]
    return results


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", NAN_STEPS, ids=list(NAN_STEPS))
def test_nans_of_one_nan_or_zero_by_zero_have_the_same_bits_in_every_backend_and_api(
    name, dtype, case
):
    config, grad = NAN_STEPS[case]
    if name == "numba":
        _numba.load()  # The compiled loops, and so the compiled step of a few elements.
    with kernels.use_backend(name):
        results = _nan_step_results(config, grad, dtype)
    with kernels.use_backend("numpy"):
        expected = _nan_step_results(config, grad, dtype)["the array kernel"]
    assert np.isnan(expected[0])
    for path, got in results.items():
        assert got.dtype == expected.dtype
        assert got.tobytes() == expected.tobytes(), f"{path}: {got.view(np.uint8)}"
