"""The options beyond the paper: per-leaf configs, the moments' dtype, Nesterov momentum, eps_root
and clipping by the global norm, checked by hand, against each other and against optax."""

from __future__ import annotations

import pickle

import attrs
import numpy as np
import pytest

from adam_functional import (
    Adam,
    AdamConfig,
    AdamState,
    adam_init,
    adam_update,
    clip_by_global_norm,
    global_norm,
    kernels,
    tree_map,
)

DECAYED = AdamConfig(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
PLAIN = AdamConfig(lr=0.01)


@pytest.fixture(params=list(kernels.BACKENDS))
def backend(request):
    """Each installed backend in turn."""
    try:
        with kernels.use_backend(request.param):
            yield request.param
    except ImportError:
        pytest.skip(f"the {request.param} backend is not installed")


def _params(rng):
    return {
        "layer": {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)},
        "head": [rng.standard_normal((3, 2)), rng.standard_normal(2).astype(np.float32)],
    }


def _grads(rng, params):
    return tree_map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), params)


def _bits(tree):
    return [None if a is None else (a.dtype.str, a.tobytes()) for a in _leaves(tree)]


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [x for value in tree for x in _leaves(value)]
    return [tree]


# -------------------------------------------------------------------------------------------------
# Per-leaf configs.


def test_each_leaf_follows_its_own_config_bit_for_bit(backend):
    # A config tree gives each leaf exactly what a separate run with its own config gives.
    rng = np.random.default_rng(0)
    params = _params(rng)
    configs = {
        "layer": {"w": DECAYED, "b": PLAIN},
        "head": AdamConfig(lr=0.02, amsgrad=True, nesterov=True, eps_root=1e-6, beta1=0.8),
    }
    state = adam_init(params, configs)
    assert state.v_max["layer"] == {"w": None, "b": None}
    assert state.v_max["head"][0].shape == (3, 2)
    separate = {
        "w": (params["layer"]["w"], adam_init(params["layer"]["w"], DECAYED), DECAYED),
        "b": (params["layer"]["b"], adam_init(params["layer"]["b"]), PLAIN),
    }
    head, head_config = params["head"], configs["head"]
    head_state = adam_init(head, head_config)
    for _ in range(4):
        grads = _grads(rng, params)
        params, state = adam_update(params, grads, state, configs)
        for key, (p, s, c) in separate.items():
            separate[key] = (*adam_update(p, grads["layer"][key], s, c), c)
        head, head_state = adam_update(head, grads["head"], head_state, head_config)
    for key, (p, s, _) in separate.items():
        assert _bits(params["layer"][key]) == _bits(p)
        assert _bits(state.m["layer"][key]) == _bits(s.m)
    assert _bits(params["head"]) == _bits(head)
    assert _bits(state.v_max["head"]) == _bits(head_state.v_max)


def test_a_mask_built_with_tree_map_keeps_decay_off_the_biases():
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    grads = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    configs = tree_map(lambda p: DECAYED if p.ndim > 1 else PLAIN, params)
    new, _ = adam_update(params, grads, adam_init(params, configs), configs)
    np.testing.assert_array_equal(new["w"], 1.0 - 0.01 * 0.1)  # Decayed, no gradient.
    np.testing.assert_array_equal(new["b"], 1.0)


def test_the_wrapper_takes_a_config_tree_and_matches_the_pure_update(backend):
    rng = np.random.default_rng(1)
    params = _params(rng)
    head = AdamConfig(lr=0.03, nesterov=True, eps_root=1e-9)
    configs = {"layer": {"w": DECAYED, "b": PLAIN}, "head": head}
    in_place = tree_map(np.copy, params)
    opt = Adam(lr=0.5)  # Its own config is not used where the tree gives one.
    state = adam_init(params, configs)
    for _ in range(3):
        grads = _grads(rng, params)
        params, state = adam_update(params, grads, state, configs)
        opt.step(in_place, grads, config=configs)
    assert _bits(in_place) == _bits(params)
    assert _bits(opt.get_state(in_place["head"][0]).m) == _bits(state.m["head"][0])


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            {"w": PLAIN},
            ValueError,
            r"config: expected the keys of params \['w', 'b'\], got \['w'\]",
        ),
        (
            {"w": PLAIN, "b": [PLAIN]},
            ValueError,
            r"config\['b'\]: expected an AdamConfig for the array of params there, got a list",
        ),
        ({"w": PLAIN, "b": 0.1}, TypeError, r"config\['b'\]: expected an AdamConfig or a dict"),
        ({"lr": 0.1}, TypeError, r"config: expected an AdamConfig, got dict \(a dict of hyper"),
    ],
)
def test_a_config_tree_that_does_not_fit_is_refused_naming_the_path(config, error, message):
    params = {"w": np.ones(2), "b": np.ones(1)}
    grads = tree_map(np.ones_like, params)
    before = _bits(params)
    with pytest.raises(error, match=message):
        adam_update(params, grads, adam_init(params), config)
    with pytest.raises(error, match=message):
        adam_init(params, config)
    opt = Adam()
    with pytest.raises(error, match=message):
        opt.step(params, grads, config=config)
    assert _bits(params) == before and len(opt.t) == 0


def test_a_leaf_follows_its_own_nonfinite_policy():
    params = {"a": np.ones(2), "b": np.ones(2)}
    grads = {"a": np.array([np.nan, 1.0]), "b": np.ones(2)}
    propagate = AdamConfig(nonfinite="propagate")
    configs = {"a": propagate, "b": AdamConfig()}
    new, state = adam_update(params, grads, adam_init(params), configs)
    assert np.isnan(new["a"][0]) and state.t == 1
    # A leaf that skips skips the whole step: the state has one step count.
    configs = {"a": AdamConfig(nonfinite="skip"), "b": AdamConfig()}
    new, state = adam_update(params, grads, adam_init(params), configs)
    assert state.t == 0 and state.skipped == 1 and _bits(new) == _bits(params)
    with pytest.raises(FloatingPointError, match=r"grads\['a'\]: expected finite gradients"):
        adam_update(params, grads, adam_init(params), AdamConfig())


@pytest.mark.parametrize(("field", "value"), [("amsgrad", True), ("moment_dtype", "float32")])
def test_what_a_state_holds_is_fixed_at_construction_in_the_wrapper(field, value):
    W = np.ones(2)
    opt = Adam()
    opt.step(W, np.ones(2))
    with pytest.raises(
        ValueError, match=rf"config: expected {field}=.* like the optimizer, got .*fixed at"
    ):
        opt.step(W, np.ones(2), config=AdamConfig(**{field: value}))
    with pytest.raises(AttributeError, match=rf"Adam.{field}: fixed at construction"):
        setattr(opt, field, value)
    assert opt.t[id(W)] == 1


def test_a_raising_leaf_wins_over_a_skipping_one_whatever_their_order():
    params = {"a": np.ones(2), "b": np.ones(2)}
    grads = {"a": np.array([np.nan, 1.0]), "b": np.array([np.inf, 1.0])}
    skip, fail = AdamConfig(nonfinite="skip"), AdamConfig()
    for configs, path in (({"a": skip, "b": fail}, "b"), ({"a": fail, "b": skip}, "a")):
        with pytest.raises(FloatingPointError, match=rf"grads\['{path}'\]: expected finite"):
            adam_update(params, grads, adam_init(params), configs)


# -------------------------------------------------------------------------------------------------
# The moments' dtype.


def test_float16_training_follows_float32_within_float16_rounding():
    # One large gradient, then a steady pull: float16 moments would overflow to inf at the
    # first step and freeze the coordinate at -0.1; float32 moments let it move on as float32
    # parameters do.
    config = AdamConfig(lr=0.1)
    runs = {}
    for dtype in (np.float16, np.float32):
        p = np.zeros(1, dtype)
        state = adam_init(p, config)
        p, state = adam_update(p, np.array([1e4], dtype), state, config)
        for _ in range(50):
            p, state = adam_update(p, np.array([-1.0], dtype), state, config)
        runs[dtype] = (p, state)
    p16, state16 = runs[np.float16]
    p32, _ = runs[np.float32]
    assert state16.m.dtype == state16.v.dtype == np.float32 and p16.dtype == np.float16
    assert float(p32[0]) < -0.5
    # Each of the 51 steps rounds p to float16 once: half an ulp each, at |p| < 1.
    assert abs(float(p16[0]) - float(p32[0])) <= 51 * 0.5 * float(np.finfo(np.float16).eps)


def test_float32_moments_halve_the_state_of_float64_parameters(backend):
    rng = np.random.default_rng(2)
    params = rng.standard_normal(1000)
    wide = AdamConfig(lr=0.01, amsgrad=True)
    narrow = attrs.evolve(wide, moment_dtype="float32")
    a, sa = params, adam_init(params, wide)
    b, sb = params, adam_init(params, narrow)
    assert sb.m.dtype == sb.v.dtype == sb.v_max.dtype == np.float32
    assert sb.m.nbytes * 2 == sa.m.nbytes
    for _ in range(20):
        g = rng.standard_normal(1000)
        a, sa = adam_update(a, g, sa, wide)
        b, sb = adam_update(b, g, sb, narrow)
    assert b.dtype == np.float64 and sb.m.dtype == np.float32
    # The moments round to float32 each step; the parameters move by lr per step at most.
    np.testing.assert_allclose(b, a, rtol=0, atol=20 * 0.01 * 1e-6)
    in_place = params.copy()
    opt = Adam.from_config(narrow)
    rng = np.random.default_rng(2)
    rng.standard_normal(1000)
    for _ in range(20):
        opt.step(in_place, rng.standard_normal(1000))
    assert _bits(in_place) == _bits(b) and opt.m[id(in_place)].dtype == np.float32


def test_moment_dtype_params_keeps_the_old_float16_moments():
    p = np.ones(3, np.float16)
    state = adam_init(p, AdamConfig(moment_dtype="params"))
    assert state.m.dtype == np.float16
    with pytest.raises(
        ValueError,
        match=r"state.m: expected dtype float32 and shape \(3,\) like params, got dtype float16 "
        r"and shape \(3,\); a state made with float16 moments needs "
        r"AdamConfig\(moment_dtype='params'\)",
    ):
        adam_update(p, np.ones(3), state, AdamConfig())


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("int32", ValueError, r"AdamConfig.moment_dtype: expected None, 'params' or a floating"),
        (object(), TypeError, r"AdamConfig.moment_dtype: expected None, 'params' or a floating"),
        ("parameters", TypeError, r"AdamConfig.moment_dtype: expected"),
    ],
)
def test_a_bad_moment_dtype_is_refused(value, error, message):
    with pytest.raises(error, match=message):
        AdamConfig(moment_dtype=value)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("nesterov", "yes", TypeError, r"AdamConfig.nesterov: expected True or False, got str"),
        ("eps_root", -1.0, ValueError, r"AdamConfig.eps_root: expected a finite number >= 0"),
        ("eps_root", float("nan"), ValueError, r"AdamConfig.eps_root: expected a finite number"),
        ("eps_root", 10**400, ValueError, r"AdamConfig.eps_root: expected .* too large"),
    ],
)
def test_bad_new_options_are_refused_naming_the_field(field, value, error, message):
    with pytest.raises(error, match=message):
        AdamConfig(**{field: value})


def test_the_options_round_trip_through_pickle_and_state_dicts():
    config = AdamConfig(lr=0.02, nesterov=True, eps_root=1e-7, moment_dtype="float32", amsgrad=True)
    assert pickle.loads(pickle.dumps(config)) == config
    W = np.linspace(-1, 1, 5)
    opt = Adam.from_config(config)
    opt.step(W, np.ones(5))
    restored = pickle.loads(pickle.dumps((W, opt)))
    clone = Adam()
    clone.load_state_dict(opt.state_dict())
    V = W.copy()
    assert clone.config == config
    for other, array in ((restored[1], restored[0]), (clone, V)):
        other.step(array, np.ones(5))
    opt.step(W, np.ones(5))
    assert _bits(W) == _bits(restored[0]) == _bits(V)


def test_a_state_dict_of_version_1_loads_with_the_moments_of_its_parameters():
    W = np.ones(2, np.float16)
    opt = Adam(moment_dtype="params")
    opt.step(W, np.ones(2))
    old = opt.state_dict()
    old["version"] = 1
    for name in ("nesterov", "eps_root", "moment_dtype"):
        del old["config"][name]
    clone = Adam()
    clone.load_state_dict(old)
    assert clone.config.moment_dtype == "params" and clone.config == opt.config


# -------------------------------------------------------------------------------------------------
# Nesterov momentum and eps_root, by hand.


def test_nesterov_first_step_by_hand():
    # t = 1, m = (1 - b1) g: b1 * m / (1 - b1**2) + (1 - b1) * g / (1 - b1) = g (0.9 / 1.9 + 1),
    # v_hat = g**2, so the step is lr * (0.09 / 0.19 + 1) * sign(g) for eps = 0.
    config = AdamConfig(lr=0.1, nesterov=True, eps=0.0)
    new, _ = adam_update(np.zeros(2), np.array([2.0, -3.0]), adam_init(np.zeros(2)), config)
    step = 0.1 * (0.9 * 0.1 / (1 - 0.81) + 1.0)
    np.testing.assert_allclose(new, [-step, step], rtol=1e-15)


def test_eps_root_keeps_a_zero_second_moment_finite():
    # v = 0 and eps = 0: without eps_root the step is 0 / 0; with it, 0 / sqrt(eps_root) = 0.
    config = AdamConfig(lr=0.1, eps=0.0, eps_root=1e-12, nonfinite="propagate")
    new, _ = adam_update(np.ones(2), np.zeros(2), adam_init(np.ones(2)), config)
    np.testing.assert_array_equal(new, 1.0)
    new, _ = adam_update(
        np.ones(2), np.zeros(2), adam_init(np.ones(2)), attrs.evolve(config, eps_root=0.0)
    )
    assert np.isnan(new).all()


# -------------------------------------------------------------------------------------------------
# Clipping by the global norm.


def test_global_norm_neither_overflows_nor_underflows():
    assert global_norm({"a": np.array([1e200, 1e200]), "b": [np.array([1e-300])]}) == pytest.approx(
        np.sqrt(2) * 1e200, rel=1e-15
    )
    assert global_norm(np.array([1e-200, 1e-200])) == pytest.approx(np.sqrt(2) * 1e-200, rel=1e-15)
    assert global_norm(np.array([3, 4], np.int8)) == 5.0
    assert global_norm([np.zeros(3), np.zeros((0, 2))]) == 0.0
    assert np.isnan(global_norm([np.array([np.inf]), np.array([np.nan])]))
    assert global_norm([np.array([np.inf, 1.0])]) == np.inf


def test_clip_by_global_norm_scales_the_whole_tree_and_keeps_dtypes():
    grads = {"w": np.array([3.0, 0.0]), "b": np.array([4.0], np.float32)}
    clipped = clip_by_global_norm(grads, 1.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.0], rtol=1e-15)
    assert clipped["b"].dtype == np.float32 and clipped["b"][0] == np.float32(0.8)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-7)
    # Under the bound: the same values, in new arrays.
    kept = clip_by_global_norm(grads, 10.0)
    assert _bits(kept) == _bits(grads)
    assert not np.shares_memory(kept["w"], grads["w"])
    # A non-finite norm clips nothing: the update's nonfinite policy judges it.
    bad = {"w": np.array([np.nan, 1e300])}
    assert _bits(clip_by_global_norm(bad, 1.0)) == _bits(bad)


@pytest.mark.parametrize(
    ("max_norm", "error", "message"),
    [
        (0.0, ValueError, r"max_norm: expected a finite number > 0, got 0.0"),
        (-1, ValueError, r"max_norm: expected a finite number > 0, got -1"),
        (float("inf"), ValueError, r"max_norm: expected a finite number > 0, got inf"),
        (float("nan"), ValueError, r"max_norm: expected a finite number > 0, got nan"),
        ("1", TypeError, r"max_norm: expected a finite number > 0, got str '1'"),
        (True, TypeError, r"max_norm: expected a finite number > 0, got bool True"),
    ],
)
def test_a_bad_max_norm_is_refused(max_norm, error, message):
    with pytest.raises(error, match=message):
        clip_by_global_norm(np.ones(2), max_norm)


def test_clipping_refuses_leaves_that_hold_no_real_numbers():
    with pytest.raises(TypeError, match=r"grads\['b'\]: expected an array of real numbers, got"):
        clip_by_global_norm({"a": np.ones(1), "b": np.array(["x"])}, 1.0)


# -------------------------------------------------------------------------------------------------
# Against optax, in float64.

STEPS = 300


def _optax():
    jax = pytest.importorskip("jax", reason="optax and jax are not installed")
    optax = pytest.importorskip("optax", reason="optax is not installed")
    return jax, optax


def _gradient_sequence(rng, params):
    return [_grads(rng, params) for _ in range(STEPS)]


def _run_optax(jax, optax, transform, params, grads):
    import jax.numpy as jnp

    with jax.enable_x64(True):
        p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        state = transform.init(p)
        for g in grads:
            updates, state = transform.update(jax.tree.map(jnp.asarray, g), state, p)
            p = optax.apply_updates(p, updates)
        return jax.tree.map(np.asarray, p)


def _run_ours(params, grads, config, clip=None):
    state = adam_init(params, config)
    for g in grads:
        if clip is not None:
            g = clip_by_global_norm(g, clip)
        params, state = adam_update(params, g, state, config)
    return params


def _assert_close(ours, theirs, rtol=1e-11):
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=rtol, atol=0, err_msg=key)


def _float64_params(seed):
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((8, 4)), "b": rng.standard_normal(4)}
    return rng, params


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"nesterov": True}, {"nesterov": True}),
        ({"eps_root": 1e-6}, {"eps_root": 1e-6}),
        (
            {"nesterov": True, "eps_root": 1e-8, "beta1": 0.8},
            {"nesterov": True, "eps_root": 1e-8, "b1": 0.8},
        ),
    ],
    ids=["nesterov", "eps_root", "both"],
)
def test_nesterov_and_eps_root_match_optax(ours, theirs):
    jax, optax = _optax()
    rng, params = _float64_params(3)
    grads = _gradient_sequence(rng, params)
    expected = _run_optax(jax, optax, optax.adam(0.01, **theirs), params, grads)
    _assert_close(_run_ours(params, grads, AdamConfig(lr=0.01, **ours)), expected)


@pytest.mark.slow
def test_clipping_chained_before_adam_matches_optax():
    jax, optax = _optax()
    rng, params = _float64_params(4)
    grads = _gradient_sequence(rng, params)
    transform = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.01))
    expected = _run_optax(jax, optax, transform, params, grads)
    _assert_close(_run_ours(params, grads, AdamConfig(lr=0.01), clip=1.0), expected)


@pytest.mark.slow
def test_adamw_with_a_mask_matches_optax():
    jax, optax = _optax()
    rng, params = _float64_params(5)
    grads = _gradient_sequence(rng, params)
    mask = {"w": True, "b": False}
    transform = optax.adamw(0.01, weight_decay=0.1, mask=mask)
    expected = _run_optax(jax, optax, transform, params, grads)
    decayed = AdamConfig(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    configs = {"w": decayed, "b": AdamConfig(lr=0.01)}
    _assert_close(_run_ours(params, grads, configs), expected)


def test_a_state_with_mixed_amsgrad_is_a_valid_record():
    state = adam_init(
        {"a": np.ones(2), "b": np.ones(1)}, {"a": AdamConfig(amsgrad=True), "b": PLAIN}
    )
    again = AdamState(m=state.m, v=state.v, t=0, v_max=state.v_max)
    assert again == state
    assert pickle.loads(pickle.dumps(state)) == state
    with pytest.raises(
        TypeError, match=r"AdamState.v_max\['b'\]: expected a NumPy array or a dict"
    ):
        AdamState(m=state.m, v=state.v, t=0, v_max={"a": state.v_max["a"], "b": "x"})


def test_the_options_round_trip_through_checkpoint_files(tmp_path):
    from adam_functional import checkpoint

    configs = {
        "a": AdamConfig(amsgrad=True, nesterov=True, eps_root=1e-7),
        "b": AdamConfig(moment_dtype="float32", weight_decay=0.1, decoupled_weight_decay=True),
    }
    params = {"a": np.linspace(-1, 1, 3), "b": np.ones(2)}
    grads = tree_map(np.ones_like, params)
    params, state = adam_update(params, grads, adam_init(params, configs), configs)
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, {"params": params, "state": state, "config": configs})
    loaded = checkpoint.load(path)
    assert loaded["config"] == configs
    assert loaded["state"] == state and loaded["state"].v_max["b"] is None
    assert loaded["state"].m["b"].dtype == np.float32
    again = adam_update(loaded["params"], grads, loaded["state"], loaded["config"])
    assert _bits(again[0]) == _bits(adam_update(params, grads, state, configs)[0])
