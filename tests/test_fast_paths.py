"""The quick paths give what the general ones give, bit for bit, and step aside where they must.

The quick paths are: the Python-float kernel for a few float64 elements, the batches of small
leaves that the pure update runs as one flat array, the flat buffers it reads back at the next
step, the one-array step in one pass, the walks compiled for a tree's structure, and the numba
loops loaded at the first large step. Each is compared with the path it stands in for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict, namedtuple

import attrs
import numpy as np
import pytest

from adam_functional import Adam, AdamConfig, AdamState, _tree, adam_init, adam_update, kernels
from adam_functional._plan import BATCH_LEAF, BATCH_SIZE
from adam_functional._records import is_sealed, seal
from adam_functional.kernels import Inputs, Outputs
from adam_functional.kernels import numpy as reference

Layer = namedtuple("Layer", ["w", "b"])

CONFIGS = [
    AdamConfig(lr=0.01),
    AdamConfig(lr=0.01, weight_decay=0.1),
    AdamConfig(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    AdamConfig(lr=0.01, amsgrad=True, nonfinite="propagate"),
    AdamConfig(lr=0.3, beta1=0.0, beta2=0.5, eps=0.0, amsgrad=True, maximize=True),
    AdamConfig(lr=0.01, nesterov=True, eps_root=1e-6, amsgrad=True, weight_decay=0.1),
    # eps of -0.0 and a v_max of -0.0 divide by -0.0: the sign of the infinity counts.
    AdamConfig(lr=0.1, eps=-0.0, amsgrad=True, nonfinite="propagate"),
    # Every option off, as the Python-float kernel's short loop takes: eps of 0.0 divides by
    # zero where v is 0.0, which that loop leaves to the full one.
    AdamConfig(lr=0.1, eps=0.0, nonfinite="propagate"),
]
SPECIAL = np.array([0.0, -0.0, 1e-310, -1e-310, 1e300, -1e300, np.nan, np.inf, -np.inf, 1.0, -3.5])


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = np.isnan(a)  # NaN's sign and payload are outside the promise (docs/algorithm.md).
    np.testing.assert_array_equal(nan, np.isnan(b))
    assert a[~nan].tobytes() == b[~nan].tobytes()


def _fresh(n: int, amsgrad: bool) -> Outputs:
    return Outputs(np.empty(n), np.empty(n), np.empty(n), np.empty(n) if amsgrad else None)


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("values", ["special", "random"])
def test_the_python_float_kernel_gives_the_bits_of_the_numpy_blocks(config, values):
    # The block path takes the whole array (more than SCALAR_SIZE elements); the Python-float
    # path each slice of at most SCALAR_SIZE. Elements are independent, so the bits must match.
    rng = np.random.default_rng(7)
    if values == "special":
        grid = np.array(np.meshgrid(SPECIAL, SPECIAL)).reshape(2, -1)
        p, g = grid[0].copy(), grid[1].copy()
        m, v = g[::-1].copy(), np.abs(p)  # v >= 0 but for NaN; -0.0 among them
        v[::7] = -1.0  # a forged state's negative v: NaN from the square root, no exception
        v[3::7] = -0.0
    else:
        n = 3 * reference.SCALAR_SIZE + 5
        p, g, m = rng.standard_normal((3, n))
        v = np.abs(rng.standard_normal(n))
    v_max = None
    if config.amsgrad:
        v_max = np.maximum(v, np.abs(np.roll(v, 1)))
        v_max[3::5] = -0.0
    c = kernels.coefficients(config, 3)
    assert p.size > reference.SCALAR_SIZE
    blocks = _fresh(p.size, config.amsgrad)
    with np.errstate(all="ignore"):
        reference.adam_leaf(Inputs(p, g, m, v, v_max), c, blocks)
    size = reference.SCALAR_SIZE
    for start in range(0, p.size, size):
        part = slice(start, start + size)
        x = Inputs(p[part], g[part], m[part], v[part], None if v_max is None else v_max[part])
        out = _fresh(x.p.size, config.amsgrad)
        assert reference.scalar_fits(x, out)
        reference.scalar(x, c, out)
        for got, expected in zip(out, blocks):
            if got is not None:
                _same_bits(got, expected[part])


def test_the_python_float_kernel_writes_outputs_of_any_layout():
    p = np.arange(12.0).reshape(3, 4)[:, ::2]  # strided, 6 elements
    g, m, v = np.ones((3, 2)), np.zeros((3, 2)), np.zeros((3, 2))
    c = kernels.coefficients(AdamConfig(lr=0.1), 1)
    expected = _fresh(6, False)
    reference.adam_leaf(
        Inputs(
            np.ascontiguousarray(p).reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), None
        ),
        c,
        expected,
    )
    buffer = np.zeros((3, 4))
    out = Outputs(buffer[:, 1::2], np.empty((3, 2)), np.empty((3, 2)), None)
    reference.scalar(Inputs(p, g, m, v, None), c, out)
    _same_bits(out.p.reshape(-1), expected.p)
    assert not buffer[:, ::2].any()  # nothing written between the strided elements


def _tree_of(rng, dtype=np.float64):
    return {
        "a": [
            Layer(rng.standard_normal((8, 4)).astype(dtype), rng.standard_normal(4).astype(dtype))
        ],
        "big": rng.standard_normal(BATCH_LEAF + 3).astype(dtype),
        "c": (rng.standard_normal(()).astype(dtype), rng.standard_normal(0).astype(dtype)),
        "d": OrderedDict(z=rng.standard_normal((5, 5)).astype(np.float32)),
        "e": [rng.standard_normal(BATCH_LEAF).astype(dtype) for _ in range(3)],
    }


def _leafwise(params, grads, states, configs):
    """The same step leaf by leaf: each leaf its own one-array update (no batches)."""
    leaves = _tree.flatten(params, "p")[0]
    g_leaves = _tree.flatten(grads, "g")[0]
    results = [adam_update(p, g, s, c) for p, g, s, c in zip(leaves, g_leaves, states, configs)]
    return [r[0] for r in results], [r[1] for r in results]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_a_tree_stepped_in_batches_gives_the_bits_of_its_leaves_stepped_alone(config):
    rng = np.random.default_rng(3)
    params = _tree_of(rng)
    leaves, treedef = _tree.flatten(params, "p")
    states_alone = [adam_init(p, config) for p in leaves]
    state = adam_init(params, config)
    configs = [config] * len(leaves)
    for step in range(4):
        grads = _tree.unflatten(
            treedef, [rng.standard_normal(p.shape).astype(p.dtype) for p in leaves]
        )
        expected, states_alone = _leafwise(params, grads, states_alone, configs)
        params, state = adam_update(params, grads, state, config)
        got = _tree.flatten(params, "p")[0]
        for a, b in zip(got, expected):
            _same_bits(a, b)
        for name in ("m", "v"):
            for a, s in zip(_tree.flatten(getattr(state, name), "s")[0], states_alone):
                _same_bits(a, getattr(s, name))
                assert not a.flags.writeable and is_sealed(a)
        if step == 1:  # The caller writes a returned parameter: the next step reads the write.
            params["e"][1][:5] = 7.0
            params["a"][0].w[0, 0] = -7.0
    # Batches were used: small leaves of one dtype share a flat buffer.
    flat = _tree.flatten(state.m, "m")[0]
    assert flat[0].base is not None and flat[0].base is flat[1].base


def test_a_batch_never_exceeds_its_size_and_big_leaves_run_alone():
    from adam_functional._plan import build

    rng = np.random.default_rng(4)
    params = [
        rng.standard_normal(n) for n in (10, BATCH_LEAF, BATCH_LEAF + 1, 5, BATCH_SIZE - 20, 30)
    ]
    params.append(rng.standard_normal(3).astype(np.float32))
    grads = [np.ones_like(p) for p in params]
    leaves, treedef = _tree.flatten(params, "p")
    config = AdamConfig()
    checked = build(
        leaves,
        treedef,
        grads,
        [None] * len(leaves),
        [config] * len(leaves),
        in_place=False,
        batched=True,
    )
    groups = [group.leaves for group in checked.plan.groups]
    assert sorted(i for group in groups for i in group) == list(range(len(params)))
    for group in groups:
        if len(group) > 1:
            assert sum(params[i].size for i in group) <= BATCH_SIZE
            assert len({params[i].dtype for i in group}) == 1
            assert all(params[i].size <= BATCH_LEAF for i in group)
    assert (2,) in groups  # larger than BATCH_LEAF: alone


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_batchs_gradient_check_decides_as_the_checks_leaf_by_leaf(dtype):
    # Small leaves of one dtype and config are checked as one flat batch; a batch that fails
    # is looked at leaf by leaf, which names the first bad leaf, or finds none.
    rng = np.random.default_rng(8)
    params = [rng.standard_normal(n).astype(dtype) for n in (7, 64, 3, 100)]
    state = adam_init(params)
    config = AdamConfig(lr=0.1)
    root = np.sqrt(np.finfo(dtype).max)
    step = adam_update(params, [np.ones_like(p) for p in params], state, config)
    assert step[0][0].base is step[0][1].base  # one batch
    for leaf, index in [(0, 0), (1, 63), (3, 50)]:
        grads = [np.ones_like(p) for p in params]
        grads[leaf][index] = np.nan
        grads[2][1] = np.inf if leaf == 3 else 1.0  # a second bad leaf after the first
        first = min(leaf, 2) if leaf == 3 else leaf
        with pytest.raises(FloatingPointError, match=rf"^grads\[{first}\]: expected finite"):
            adam_update(params, grads, state, config)
        skipped_p, skipped = adam_update(params, grads, state, AdamConfig(nonfinite="skip"))
        assert skipped.skipped == 1 and skipped.t == 0
        for a, b in zip(skipped_p, params):
            _same_bits(a, b)
    # Every square fits, their sum does not: the batch's quick test fails and the step is taken,
    # with the bits of each leaf stepped alone.
    grads = [np.ones_like(p) for p in params]
    grads[0][0] = grads[1][0] = grads[3][99] = dtype(root * 0.9)
    got, new_state = adam_update(params, grads, state, config)
    expected, _ = _leafwise(params, grads, [adam_init(p) for p in params], [config] * 4)
    assert new_state.t == 1
    for a, b in zip(got, expected):
        _same_bits(a, b)
    # One square too large: named, with its leaf.
    grads[3][99] = dtype(root * 1.5)
    with pytest.raises(FloatingPointError, match=r"^grads\[3\]: .* whose square overflows"):
        adam_update(params, grads, state, config)


def test_a_batch_checked_late_keeps_the_order_of_the_decisions():
    # The batches' gradients are checked as the run gathers them, after the other leaves' and
    # the scalars: yet a bad gradient whose config raises still wins over one whose skips, and
    # over a schedule's error, as when every leaf is checked first.
    small = [np.ones(5), np.ones(7)]  # one batch
    big = np.ones(BATCH_LEAF + 1)  # alone, checked before the run
    params = {"big": big, "small": small}
    state = adam_init(params)
    bad_small = {"big": np.ones_like(big), "small": [np.ones(5), np.array([1.0] * 6 + [np.nan])]}
    bad_both = {"big": np.full_like(big, np.inf), "small": bad_small["small"]}
    skip, raise_ = AdamConfig(nonfinite="skip"), AdamConfig(nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"^grads\['small'\]\[1\]: expected finite"):
        adam_update(params, bad_both, state, {"big": skip, "small": raise_})
    failing = AdamConfig(lr=lambda t: float("nan"))
    with pytest.raises(FloatingPointError, match=r"^grads\['small'\]\[1\]: expected finite"):
        adam_update(params, bad_small, state, failing)
    skipping = AdamConfig(lr=lambda t: float("nan"), nonfinite="skip")
    _, skipped = adam_update(params, bad_small, state, skipping)
    assert skipped.skipped == 1 and skipped.t == 0
    with pytest.raises(ValueError, match=r"^AdamConfig.lr\(1\): expected a finite number"):
        adam_update(params, {"big": np.ones_like(big), "small": small}, state, skipping)


def test_the_first_bad_leaf_is_named_whether_or_not_it_is_in_a_batch():
    # The leaves of a batch are checked late, but a bad one before a big leaf's is named first.
    params = [np.zeros(10), np.zeros(10), np.zeros(BATCH_LEAF + 1)]
    grads = [np.array([np.nan] + [0.0] * 9), np.zeros(10), np.full(BATCH_LEAF + 1, np.inf)]
    with pytest.raises(FloatingPointError, match=r"^grads\[0\]: expected finite"):
        adam_update(params, grads, adam_init(params), AdamConfig())


def test_a_steps_plan_is_kept_while_the_gradient_dtypes_and_the_kernels_stay():
    from adam_functional import _update

    params = {"a": np.ones((3, 4)), "b": np.ones(5), "big": np.ones(BATCH_LEAF + 1)}
    grads = {key: np.full_like(p, 0.5) for key, p in params.items()}
    config = AdamConfig(lr=0.1)
    params, state = adam_update(params, grads, adam_init(params), config)
    plan = _update._made[id(state)].plan
    params, state = adam_update(params, grads, state, config)
    assert _update._made[id(state)].plan is plan
    # Other gradient dtypes: planned anew, with the bits of a state the update did not make.
    narrow = {key: g.astype(np.float32) for key, g in grads.items()}
    got, got_state = adam_update(params, narrow, state, config)
    assert _update._made[id(got_state)].plan is not plan
    unmade = AdamState({k: x.copy() for k, x in state.m.items()}, dict(state.v), state.t)
    expected, _ = adam_update({k: p.copy() for k, p in params.items()}, narrow, unmade, config)
    for key in got:
        _same_bits(got[key], expected[key])
    # Another backend: its kernels, planned anew.
    with kernels.use_backend("numpy"):
        _, numpy_state = adam_update(params, grads, state, config)
    assert _update._made[id(numpy_state)].plan is not plan


def test_a_state_whose_trees_were_changed_is_read_as_it_now_is():
    rng = np.random.default_rng(5)
    config = AdamConfig(lr=0.1)
    params = {"a": rng.standard_normal(6), "b": rng.standard_normal(4)}
    grads = {"a": np.ones(6), "b": -np.ones(4)}
    params, state = adam_update(params, grads, adam_init(params), config)
    # The state's dict is a plain dict: put another (sealed) moment in it.
    replaced = seal(np.full(6, 0.5))
    state.m["a"] = replaced
    got, _ = adam_update(params, grads, state, config)
    expected, _ = adam_update(
        {"a": params["a"].copy(), "b": params["b"].copy()},
        grads,
        AdamState(
            {"a": replaced.copy(), "b": state.m["b"].copy()},
            {k: x.copy() for k, x in state.v.items()},
            1,
        ),
        config,
    )
    for key in got:
        _same_bits(got[key], expected[key])


def test_the_buffers_behind_returned_parameters_are_not_read_once_they_are_replaced():
    config = AdamConfig(lr=0.1)
    params = {"a": np.ones(6), "b": np.ones(4)}
    grads = {"a": np.ones(6), "b": np.ones(4)}
    params, state = adam_update(params, grads, adam_init(params), config)
    params["a"] = np.full(6, 3.0)  # a new array, not the view the step returned
    got, _ = adam_update(params, grads, state, config)
    alone, _ = adam_update(
        np.full(6, 3.0), np.ones(6), AdamState(state.m["a"], state.v["a"], 1), config
    )
    _same_bits(got["a"], alone)


@pytest.mark.parametrize("shape", [(2, 2), (3,), (), (0,), (40, 3)])
@pytest.mark.parametrize("config", CONFIGS[:3], ids=range(3))
def test_one_array_in_one_pass_gives_the_general_steps_bits(shape, config):
    rng = np.random.default_rng(6)
    p = rng.standard_normal(shape)
    W, opt = p.copy(), Adam.from_config(config)
    state = adam_init(p, config)
    tree_state = adam_init([p], config)
    for _ in range(3):
        g = rng.standard_normal(shape)
        p_one, state = adam_update(p, g, state, config)
        (p_tree,), tree_state = adam_update([p], [g], tree_state, config)  # the general path
        opt.step(W, g)
        _same_bits(p_one, p_tree)
        _same_bits(W, p_tree)
        _same_bits(state.m, tree_state.m[0])
        p = p_one


def test_compiled_walks_check_the_whole_structure():
    tree = {"x": [np.ones(2), (np.ones(1),)], 3: Layer(np.ones(3), np.ones(()))}
    leaves, treedef = _tree.flatten(tree, "params")
    again, treedef_again = _tree.flatten(tree, "params")
    assert treedef_again is treedef and all(a is b for a, b in zip(again, leaves))
    reordered = {3: tree[3], "x": tree["x"]}
    # Another key order: flatten keeps it, flatten_like accepts it.
    assert _tree.flatten(reordered, "params")[1] != treedef
    assert all(a is b for a, b in zip(_tree.flatten_like(reordered, treedef, "g"), leaves))
    for changed, message in [
        (
            {"x": [np.ones(2), [np.ones(1)]], 3: tree[3]},
            r"g\['x'\]\[1\]: expected a tuple like params",
        ),
        ({"x": [np.ones(2)], 3: tree[3]}, r"g\['x'\]: expected a list of length 2 like params"),
        ({"x": tree["x"], 4: tree[3]}, r"g: expected the keys of params"),
        (
            {"x": [{"k": np.ones(2)}, (np.ones(1),)], 3: tree[3]},
            r"g\['x'\]\[0\]: expected an array like params",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            _tree.flatten_like(changed, treedef, "g")
    rebuilt = _tree.unflatten(treedef, leaves)
    assert (
        type(rebuilt[3]) is Layer and type(rebuilt["x"][1]) is tuple and list(rebuilt) == ["x", 3]
    )
    # Leaves of another library, or None, take the general walk.
    assert _tree.flatten_like({"x": [1.0, (np.ones(1),)], 3: tree[3]}, treedef, "g")[0] == 1.0


def test_the_table_of_sealed_arrays_forgets_dead_ones():
    from adam_functional import _records

    for _ in range(5000):
        seal(np.zeros(1))
    assert len(_records._SEALED) < 3000
    kept = seal(np.zeros(2))
    assert is_sealed(kept) and is_sealed(kept[:1]) and not is_sealed(np.zeros(2))
    writeable_view = np.zeros(3)
    assert not is_sealed(writeable_view[:2])


@pytest.mark.slow
def test_the_numba_loops_load_at_the_first_large_step_only():
    pytest.importorskip("numba")
    script = (
        "import sys, numpy as np\n"
        "from adam_functional import Adam, kernels\n"
        "from adam_functional.kernels import numba as backend\n"
        "opt = Adam()\n"
        "small = np.ones(1000); opt.step(small, np.ones(1000))\n"
        "print(kernels.backend(), 'numba' in sys.modules)\n"
        "big = np.ones(backend.COMPILED_MIN); opt.step(big, np.ones(backend.COMPILED_MIN))\n"
        "print('numba' in sys.modules, backend._loops is not None)\n"
        "opt.step(small, np.ones(1000))\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "ADAM_FUNCTIONAL_BACKEND"}
    chosen = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True
    )
    assert chosen.stdout.split() == ["numba", "False", "True", "True"]
    # Forced, numba is wanted whatever the sizes: it loads at once.
    environment["ADAM_FUNCTIONAL_BACKEND"] = "numba"
    forced = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True
    )
    assert forced.stdout.split() == ["numba", "True", "True", "True"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_gradient_check_decides_as_the_numpy_one(dtype):
    numba_backend = pytest.importorskip("adam_functional.kernels.numba")
    assert numba_backend.load()
    work = np.dtype(dtype)
    root = np.sqrt(np.finfo(work).max)  # the largest |g| whose square fits
    # The compiled check reads four quarters side by side and then the few elements left: a bad
    # value in each of them, and at both ends of a chunk, must be found.
    from adam_functional.kernels import _numba_loops

    chunk = _numba_loops._CHECK_CHUNK
    n = 8 * chunk + 3
    quarter = n // 4
    places = [
        0,
        quarter - 1,
        quarter,
        2 * quarter + chunk - 1,
        2 * quarter + chunk,
        3 * quarter,
        n - 1,
    ]
    big = np.ones(n, work)
    cases = {"ones": big}
    for name, value in [
        ("nan", np.nan),
        ("inf", -np.inf),
        ("above the root", np.nextafter(root, np.inf)),
        ("the root", root),
        ("below the root", np.nextafter(root, 0)),
    ]:
        for place in places:
            g = big.copy()
            g[place] = value
            cases[f"{name} at {place}"] = g
    for name, g in cases.items():
        compiled = numba_backend.squares_fit(g, float(root))
        # NumPy's sum of squares may not tell (its sum overflows): it then says False, and the
        # step looks value by value. Where it says True, the compiled check must agree.
        by_numpy = reference.squares_fit(g, work)
        assert compiled is not None
        if by_numpy:
            assert compiled, name
        if name.startswith(("nan", "inf", "above the root")):
            assert not compiled, name
        else:
            assert compiled, name
        with kernels.use_backend("numba"):
            assert kernels.squares_fit(g, work) == compiled


def test_a_gradient_of_unknown_owner_over_the_parameter_is_read_from_a_copy():
    import ctypes

    config = AdamConfig(lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    results = []
    for wrap in (lambda a: a, lambda a: [a]):  # the one-array pass, and the general path
        opt = Adam.from_config(config)
        p = np.linspace(1.0, 2.0, 100)
        opt.step(wrap(p), wrap(np.ones(100)))
        # The same memory as p, reached through a pointer: no reference says whose it is.
        g = np.ctypeslib.as_array(p.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), p.shape)
        opt.step(wrap(p), wrap(g))
        results.append(p.copy())
    opt = Adam.from_config(config)
    expected = np.linspace(1.0, 2.0, 100)
    opt.step(expected, np.ones(100))
    opt.step(expected, expected.copy())
    for got in results:
        _same_bits(got, expected)


def test_keys_equal_to_those_of_another_tree_keep_their_types():
    from enum import Enum

    class Key(str, Enum):
        A = "a"

    config = AdamConfig()
    p, g = np.ones(3), np.ones(3)
    for first, second in [(1, True), (1, 1.0), ("a", Key.A), ("a", np.str_("a"))]:
        adam_init({first: p, "z": [p]})  # the structure the walks learn first
        new, state = adam_update(
            {second: p, "z": [p]}, {second: g, "z": [g]}, adam_init({second: p, "z": [p]}), config
        )
        assert [type(k) for k in new] == [type(second), str]
        assert [type(k) for k in state.m] == [type(second), str]


def test_a_returned_parameter_given_other_strides_is_read_through_them():
    config = AdamConfig(lr=0.1)
    params = {"a": np.arange(4.0), "b": np.ones(3)}
    grads = {"a": np.ones(4), "b": np.ones(3)}
    new, state = adam_update(params, grads, adam_init(params), config)
    with pytest.warns(DeprecationWarning, match="strides"):
        new["a"].strides = (0,)  # the same object, reading its first element four times
    got, _ = adam_update(new, grads, state, config)
    alone, _ = adam_update(
        np.array(new["a"]), np.ones(4), AdamState(state.m["a"], state.v["a"], 1), config
    )
    _same_bits(got["a"], alone)


# -------------------------------------------------------------------------------------------------
# The step of a few float64 elements (a plan of one "small" group, `kernels.small_step`): Python
# floats, or numba's `small` once the loops are loaded; both APIs take it for one array.

SMALL_BACKENDS = ["numpy", "numba"]
SMALL_CONFIGS = [
    AdamConfig(lr=0.01),
    AdamConfig(lr=0.01, weight_decay=0.01),  # the notebook's L2
    # eps of 0.0 divides by zero where v is 0.0: Python raises there, numba gives inf or NaN.
    AdamConfig(lr=0.1, eps=0.0, nonfinite="propagate"),
    AdamConfig(lr=0.3, beta1=0.0, beta2=0.0, weight_decay=0.5),
    # L2 is on, though the decay rounds to 0.0 in float32: an infinite p makes g NaN there.
    AdamConfig(lr=0.01, weight_decay=5e-324),
]


@pytest.fixture(params=SMALL_BACKENDS)
def small_backend(request, monkeypatch):
    """Each backend, as `use_backend` makes it (numba loaded), and a count of the small steps
    that ran to the end."""
    if request.param == "numba":
        pytest.importorskip("numba")
    taken = []
    original = kernels.small_step

    def counted(*args):
        done = original(*args)
        taken.append(done)
        return done

    monkeypatch.setattr(kernels, "small_step", counted)
    with kernels.use_backend(request.param):
        yield taken


def _slot_entry(m, v, t):
    return {"m": m, "v": v, "t": t, "skipped": 0, "consecutive_skips": 0}


def _small_case(rng, shape, values, dtype=np.float64):
    p, g, m, v = (np.array(rng.standard_normal(shape)) for _ in range(4))
    v = np.abs(v, out=v)
    if values == "special":  # parameters and moments of every kind, gradients finite
        n = p.size
        p.reshape(-1)[:] = np.resize(SPECIAL, n)
        m.reshape(-1)[:] = np.resize(SPECIAL[::-1], n)
        v.reshape(-1)[:] = np.resize([0.0, -0.0, 1e-310, 1e300, 2.0], n)
        g.reshape(-1)[::3] = 0.0
    with np.errstate(over="ignore"):  # 1e300 is infinite in float32
        return tuple(a.astype(dtype) for a in (p, g, m, v))


@pytest.mark.parametrize("shape", [(), (2, 2), (3, 5)])
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=range(len(SMALL_CONFIGS)))
@pytest.mark.parametrize("values", ["random", "special"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_small_array_steps_with_the_bits_of_the_reference_kernel(
    small_backend, shape, config, values, dtype
):
    # float64 takes the small step on both backends; float32 with numba's loops only.
    rng = np.random.default_rng(11)
    p, g, m, v = _small_case(rng, shape, values, dtype)
    if values == "special":  # L2 of an infinite parameter makes the gradient infinite
        config = attrs.evolve(config, nonfinite="propagate")
    state = AdamState(m=m, v=v, t=4)
    taken = dtype == np.float64 or kernels.backend() == "numba"
    with np.errstate(all="ignore"):
        expected = Outputs(*(np.empty(p.size, dtype) for _ in range(3)), None)
        reference.adam_leaf(
            Inputs(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), None),
            kernels.coefficients(config, 5),
            expected,
        )
        (tree_p,), tree_state = adam_update([p], [g], AdamState(m=[m], v=[v], t=4), config)
        new_p, new_state = adam_update(p, g, state, config)
        opt = Adam.from_config(config)
        W = p.copy()
        loaded = {**opt.state_dict(), "state": [_slot_entry(m, v, 4)], "names": ["params"]}
        opt.load_state_dict(loaded, W)  # bound to W: its next step is a small one
        opt.step(W, g)
    if values == "random":
        assert small_backend == [taken] * 3  # a tree of it, the pure update's, the wrapper's
    elif dtype == np.float64 and config.weight_decay == 0.0 and config.eps > 0.0:
        assert any(small_backend)  # no infinity (1e300 is one in float32), no 0 / 0
    for got_p, got_m, got_v in [
        (new_p, new_state.m, new_state.v),
        (W, opt.m[id(W)], opt.v[id(W)]),
        (tree_p, tree_state.m[0], tree_state.v[0]),
    ]:
        _same_bits(got_p.reshape(-1), expected.p)
        _same_bits(got_m.reshape(-1), expected.m)
        _same_bits(got_v.reshape(-1), expected.v)
    assert new_state.t == opt.t[id(W)] == 5
    assert is_sealed(new_state.m) and is_sealed(new_state.v)
    assert not np.shares_memory(new_p, p) and not np.shares_memory(new_state.m, m)


def _stepped_once(config, p):
    """An optimizer that has stepped ``p`` once (its next steps may be small ones)."""
    opt = Adam.from_config(config)
    opt.step(p, np.full(p.shape, 0.5))
    return opt


@pytest.mark.parametrize(
    ("dtype", "bad"),
    [(np.float64, np.nan), (np.float64, np.inf), (np.float64, -1e200), (np.float32, 1e20)],
)
def test_a_small_step_with_a_bad_gradient_changes_nothing_and_says_so(small_backend, dtype, bad):
    # 1e20 is finite in float32, its square is not.
    config = AdamConfig(lr=0.01, weight_decay=0.01)
    p = np.array([[1.0, 2.0], [3.0, 4.0]], dtype)
    opt = _stepped_once(config, p)
    small_backend.clear()  # The first step, of a finite gradient, may be a small one.
    state = adam_init(p, config)
    before = p.copy(), opt.m[id(p)].copy(), opt.v[id(p)].copy()
    g = np.array([[0.1, 0.2], [bad, 0.4]], dtype)
    for step in (lambda: opt.step(p, g), lambda: adam_update(p, g, state, config)):
        with pytest.raises(
            FloatingPointError, match=r"^grads: expected finite gradients.*\(1, 0\)"
        ):
            step()
    for got, expected in zip((p, opt.m[id(p)], opt.v[id(p)]), before):
        assert got.tobytes() == expected.tobytes()
    assert opt.t[id(p)] == 1 and not state.m.any()
    opt.nonfinite = "skip"
    opt.step(p, g)
    new_p, new_state = adam_update(p, g, state, opt.config)
    assert opt.t[id(p)] == 1 and new_state.t == 0 and new_state.skipped == 1
    assert p.tobytes() == before[0].tobytes() == new_p.tobytes()
    assert not any(small_backend)


def test_squares_that_fit_but_sum_past_the_largest_float_still_step(small_backend):
    # With beta2 = 0, v is g * g: four squares of 1e308 each fit, their sum does not. The
    # Python-float step leaves that to the general path, which looks value by value.
    config = AdamConfig(lr=0.1, beta2=0.0)
    p, g = np.ones((2, 2)), np.full((2, 2), 1e154)
    opt = _stepped_once(config, p)
    tree_state = AdamState(m=[opt.m[id(p)]], v=[opt.v[id(p)]], t=1)
    (expected,), _ = adam_update([p], [g], tree_state, config)
    opt.step(p, g)
    _same_bits(p, expected)
    assert opt.t[id(p)] == 2 and np.isfinite(opt.v[id(p)]).all()


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_a_small_gradient_over_its_own_parameter_is_read_before_it_is_written(
    small_backend, offset
):
    # The gradient is the parameter's memory, or that memory shifted by one element either way.
    config = AdamConfig(lr=0.1, weight_decay=0.01)
    buffer = np.linspace(1.0, 2.0, 6)
    p = buffer[1:5]
    expected = p.copy()
    opt, reference_opt = _stepped_once(config, p), _stepped_once(config, expected)
    small_backend.clear()
    for _ in range(3):
        g = buffer[1 + offset : 5 + offset]
        reference_opt.step(expected, g.copy())
        opt.step(p, g)
        _same_bits(p, expected)
    assert small_backend.count(True) == 6


@pytest.mark.parametrize("shape", [(2, 2), (4, 5)])
def test_moments_restored_from_transposed_views_are_written_in_place(small_backend, shape):
    # A state may hold moments of any layout (here read-only transposed views of sealed arrays,
    # which it keeps as they are); the optimizer's own copies are C-contiguous, as the in-place
    # kernels write them.
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal(shape), rng.standard_normal(shape)
    m, v = (seal(np.abs(rng.standard_normal(shape[::-1]))) for _ in range(2))
    results = []
    for m_in, v_in in [(m.T, v.T), (np.ascontiguousarray(m.T), np.ascontiguousarray(v.T))]:
        opt, W = Adam(lr=0.1), p.copy()
        entry = _slot_entry(m_in, v_in, 3)
        opt.load_state_dict({**opt.state_dict(), "state": [entry], "names": ["params"]}, W)
        opt.step(W, g)
        results.append((W, opt.m[id(W)], opt.v[id(W)]))
    for got, expected in zip(*results):
        _same_bits(got, expected)
    assert not np.array_equal(results[0][1], m.T)  # the moments moved


def test_a_decay_that_rounds_to_zero_in_float32_still_applies_l2(small_backend):
    # weight_decay = 5e-324 is L2 on, and 0.0 in float32: an infinite parameter times it is NaN
    # there, in the gradient and so in the moments, as the general path computes it.
    config = AdamConfig(lr=0.01, weight_decay=5e-324, nonfinite="propagate")
    p = np.array([1.0, np.inf, -2.0, 0.5], np.float32)
    g = np.full(4, 0.25, np.float32)
    state = adam_init(p, config)
    new_p, new_state = adam_update(p, g, state, config)
    (tree_p,), tree_state = adam_update([p], [g], adam_init([p], config), config)
    for got, expected in zip(
        (new_p, new_state.m, new_state.v), (tree_p, *tree_state.m, *tree_state.v)
    ):
        _same_bits(got, expected)
    assert np.isnan(new_state.m[1]) and not np.isnan(new_state.m[0])


def test_a_small_step_that_numba_cannot_compile_is_taken_in_python_floats(monkeypatch):
    numba_kernels = pytest.importorskip("adam_functional.kernels.numba")
    with kernels.use_backend("numba"):
        monkeypatch.setattr(numba_kernels, "_small", None)
        monkeypatch.setattr(numba_kernels, "_failed", set())
        monkeypatch.setitem(sys.modules, "adam_functional.kernels._numba_small", None)
        p, g = np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.25, -1.0])
        # Warnings are errors here: the failure is remembered all the same, and said once.
        with pytest.raises(RuntimeWarning, match=r"numba cannot compile the step of a few elem"):
            adam_update(p, g, adam_init(p), AdamConfig(lr=0.1))
        assert "_numba_small" in numba_kernels._failed
        new_p, _ = adam_update(p, g, adam_init(p), AdamConfig(lr=0.1))
        (expected,), _ = adam_update([p], [g], adam_init([p]), AdamConfig(lr=0.1))
        _same_bits(new_p, expected)
