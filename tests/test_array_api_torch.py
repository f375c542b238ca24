"""PyTorch: adam_update returns new tensors; Adam.step writes tensors and nn.Parameters in place.

Only the CPU is tested here. ``Adam.step`` writes CPU tensors through NumPy views of their
memory, with the NumPy kernels, and so gives the NumPy wrapper's bits; tensors it cannot view
(bfloat16, a negative view, other devices) and ``adam_update`` take the generic kernel, which
array-api-strict's device (see ``test_array_api.py``) holds to the array API.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import pytest
from test_array_api import STEPS, load_library

import adam_functional as af
from adam_functional import AdamConfig, adam_init, adam_update


@pytest.fixture(scope="module")
def torch() -> Any:
    load_library("torch")  # skips without torch or array-api-compat
    import torch

    return torch


def test_adam_update_returns_new_tensors_and_leaves_its_inputs(torch: Any) -> None:
    config = AdamConfig(lr=0.1, amsgrad=True, nonfinite="skip")
    p = torch.linspace(-1, 1, 6, dtype=torch.float64)
    g = torch.full((6,), 0.5, dtype=torch.float64)
    before = p.clone()
    state = adam_init(p, config)
    new_p, new_state = adam_update(p, g, state, config)
    assert type(new_p) is torch.Tensor and new_p.dtype == torch.float64
    assert new_p.device == p.device and new_state.m.device == p.device
    assert new_p.data_ptr() != p.data_ptr()
    assert torch.equal(p, before) and not torch.any(state.m)
    expected, _ = adam_update(before.numpy(), g.numpy(), adam_init(before.numpy(), config), config)
    np.testing.assert_array_equal(new_p.numpy(), expected)  # the NumPy kernels, on views


def test_adam_update_under_no_grad_gives_plain_tensors(torch: Any) -> None:
    # Called on tensors that require gradients, adam_update is recorded by autograd like any
    # other torch operation; under torch.no_grad() its results are plain tensors.
    w = torch.nn.Parameter(torch.ones(3))
    state = adam_init(w)
    recorded, _ = adam_update(w, torch.ones(3), state, AdamConfig(lr=0.1))
    assert recorded.grad_fn is not None
    with torch.no_grad():
        plain, plain_state = adam_update(w, torch.ones(3), state, AdamConfig(lr=0.1))
    assert plain.grad_fn is None and not plain.requires_grad and plain_state.m.grad_fn is None
    assert torch.equal(plain, recorded.detach())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_step_writes_in_place_and_matches_the_numpy_wrapper(torch: Any, dtype: str) -> None:
    config = AdamConfig(lr=0.01, amsgrad=True, weight_decay=0.01, decoupled_weight_decay=True)
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3)).astype(dtype)
    grads = rng.normal(size=(STEPS, 4, 3)).astype(dtype)
    W = torch.tensor(w)
    storage, version = W.data_ptr(), W._version
    opt, reference = af.Adam.from_config(config), af.Adam.from_config(config)
    expected = w.copy()
    for g in grads:
        opt.step(W, torch.tensor(g))
        reference.step(expected, g)
    assert W.data_ptr() == storage and W._version > version
    assert W.dtype == getattr(torch, dtype)
    m = opt.m[id(W)]
    assert type(m) is torch.Tensor and m.dtype == W.dtype and m.device == W.device
    assert opt.t[id(W)] == STEPS
    # Stepped through views of its memory by the NumPy kernels: the NumPy wrapper's bits.
    np.testing.assert_array_equal(W.numpy(), expected)
    np.testing.assert_array_equal(m.numpy(), reference.m[id(expected)])


def test_adam_step_trains_nn_parameters_in_place(torch: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = dict(model.named_parameters())
    storages = {name: p.data_ptr() for name, p in params.items()}
    opt = af.Adam(lr=0.05)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        opt.step(params, {name: p.grad for name, p in params.items()})
        losses.append(loss.item())
    for name, p in params.items():
        assert type(p) is torch.nn.Parameter and p.requires_grad and p.grad_fn is None
        assert p.data_ptr() == storages[name] and p.dtype == torch.float32
        assert type(opt.m[id(p)]) is torch.Tensor
    assert losses[-1] < 0.5 * losses[0]


def test_adam_step_writes_a_transposed_view(torch: Any) -> None:
    base = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
    view = base.T  # not contiguous: written through the view into base's storage
    g = torch.ones(3, 4, dtype=torch.float64)
    opt, reference = af.Adam(lr=0.1), af.Adam(lr=0.1)
    expected = base.numpy().T.copy()
    for _ in range(3):
        opt.step(view, g)
        reference.step(expected, g.numpy())
    np.testing.assert_array_equal(base.T.numpy(), expected)


def test_float16_tensors_keep_float32_moments_in_the_wrapper(torch: Any) -> None:
    W = torch.linspace(-1, 1, 5, dtype=torch.float16)
    opt = af.Adam(lr=0.01)
    opt.step(W, torch.ones(5, dtype=torch.float16))
    assert W.dtype == torch.float16 and opt.m[id(W)].dtype == torch.float32
    expected = np.linspace(-1, 1, 5).astype(np.float16)
    af.Adam(lr=0.01).step(expected, np.ones(5, np.float16))
    np.testing.assert_array_equal(W.numpy(), expected)


def test_a_failed_step_changes_nothing(torch: Any) -> None:
    W = torch.ones(3)
    opt = af.Adam(lr=0.1)
    opt.step(W, torch.ones(3))
    before, m_before = W.clone(), opt.m[id(W)]
    with pytest.raises(FloatingPointError, match=r"^grads: expected finite gradients"):
        opt.step(W, torch.tensor([1.0, float("nan"), 0.0]))
    assert torch.equal(W, before) and torch.equal(opt.m[id(W)], m_before)
    assert opt.t[id(W)] == 1


def test_adam_step_tells_autograd_it_wrote_the_tensors(torch: Any) -> None:
    # As torch's optimizers: a graph that saved a parameter refuses a backward pass through it
    # once a step has overwritten it, and one step bumps the version once.
    w = torch.nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float64))
    loss = (w * w).sum()  # saves w
    version = w._version
    opt = af.Adam(lr=0.1)
    opt.step(w, torch.ones(4, dtype=torch.float64))
    assert w._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(
    "config",
    [
        AdamConfig(lr=0.01),
        AdamConfig(lr=0.01, amsgrad=True, weight_decay=0.1, nonfinite="skip"),
        AdamConfig(
            lr=0.01, nesterov=True, maximize=True, weight_decay=0.1, decoupled_weight_decay=True
        ),
    ],
    ids=["plain", "amsgrad-l2", "nesterov-adamw"],
)
def test_adam_step_on_a_tree_of_tensors_gives_the_numpy_wrappers_bits(torch: Any, config) -> None:
    rng = np.random.default_rng(9)
    arrays = {
        "w": rng.normal(size=(5, 3)),
        "b": rng.normal(size=3).astype(np.float32),
        "h": rng.normal(size=4).astype(np.float16),
        "s": np.array(0.5),
    }
    tensors = {key: torch.tensor(a) for key, a in arrays.items()}
    opt, reference = af.Adam.from_config(config), af.Adam.from_config(config)
    for _ in range(STEPS):
        grads = {key: rng.normal(size=a.shape).astype(a.dtype) for key, a in arrays.items()}
        grads["b"] = (grads["b"] * 10).astype(np.int64)  # integer gradients are cast
        opt.step(tensors, {key: torch.tensor(g) for key, g in grads.items()})
        reference.step(arrays, grads)
    for key, a in arrays.items():
        np.testing.assert_array_equal(tensors[key].numpy(), a)
        m = opt.m[id(tensors[key])]
        assert type(m) is torch.Tensor
        np.testing.assert_array_equal(m.numpy(), reference.m[id(a)])


@pytest.mark.parametrize(
    "config",
    [
        AdamConfig(lr=0.01, nonfinite="skip"),
        AdamConfig(lr=0.01, amsgrad=True, nonfinite="skip", weight_decay=0.1),
    ],
    ids=["plain", "amsgrad-skip"],
)
def test_adam_update_on_tensors_gives_the_bits_of_numpy_and_of_adam_step(
    torch: Any, config
) -> None:
    rng = np.random.default_rng(10)
    arrays = {"w": rng.normal(size=(4, 3)), "h": rng.normal(size=5).astype(np.float16)}
    tensors = {key: torch.tensor(a) for key, a in arrays.items()}
    in_place = {key: t.clone() for key, t in tensors.items()}
    state, numpy_state = adam_init(tensors, config), adam_init(arrays, config)
    opt = af.Adam.from_config(config)
    for step in range(STEPS):
        grads = {key: rng.normal(size=a.shape).astype(a.dtype) for key, a in arrays.items()}
        if step == 3:
            grads["w"][1, 1] = np.nan  # skipped, by all three
        torch_grads = {key: torch.tensor(g) for key, g in grads.items()}
        before = {key: t.clone() for key, t in tensors.items()}
        tensors, state = adam_update(tensors, torch_grads, state, config)
        arrays, numpy_state = adam_update(arrays, grads, numpy_state, config)
        opt.step(in_place, torch_grads)
        if step == 3:  # skipped: the parameters as they were
            assert all(torch.equal(before[key], t) for key, t in tensors.items())
    assert state.t == numpy_state.t == STEPS - 1 and state.skipped == 1
    for key, a in arrays.items():
        assert type(tensors[key]) is torch.Tensor and type(state.m[key]) is torch.Tensor
        np.testing.assert_array_equal(tensors[key].numpy(), a)
        np.testing.assert_array_equal(in_place[key].numpy(), a)
        np.testing.assert_array_equal(state.v[key].numpy(), numpy_state.v[key])
        np.testing.assert_array_equal(opt.v[id(in_place[key])].numpy(), numpy_state.v[key])
    # The NumPy path's check, on the views, says where the bad value is.
    bad = {key: torch.zeros_like(t) for key, t in tensors.items()}
    bad["w"][2, 1] = float("inf")
    message = r"^grads\['w'\]: expected finite gradients, got 1 NaN or infinite value of 12 \(first at index \(2, 1\): inf\)"
    with pytest.raises(FloatingPointError, match=message):
        adam_update(tensors, bad, state, attrs.evolve(config, nonfinite="raise"))
    with pytest.raises(FloatingPointError, match=message):
        opt.step(in_place, bad, attrs.evolve(config, nonfinite="raise"))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_adam_step_writes_the_moments_of_tensors_of_any_layout(torch: Any, backend: str) -> None:
    # Tensors laid out channels-last or transposed get moments of their own, C-contiguous,
    # which the kernels write; more elements than one NumPy block, and numba at any size.
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    shape = (128, 32, 3, 3)
    rng = np.random.default_rng(11)
    w, g = rng.normal(size=shape), rng.normal(size=shape)
    tensors = [
        torch.tensor(w).to(memory_format=torch.channels_last),
        torch.tensor(w.reshape(128, -1).T.copy()).T,  # a transposed view
    ]
    expected = [w.copy(), w.reshape(128, -1).copy()]
    grads = [torch.tensor(g), torch.tensor(g.reshape(128, -1))]
    with af.kernels.use_backend(backend):
        for W, E, G in zip(tensors, expected, grads):
            opt, reference = af.Adam(lr=0.01), af.Adam(lr=0.01)
            for _ in range(3):
                opt.step(W, G)
                reference.step(E, G.numpy())
            np.testing.assert_array_equal(W.numpy(), E)
            np.testing.assert_array_equal(opt.m[id(W)].numpy(), reference.m[id(E)])


def test_adam_step_takes_gradients_torch_has_no_view_of(torch: Any) -> None:
    # A ZeroTensor has no memory to view: the generic kernel steps it. An inference tensor's
    # memory is only read: viewed, with the NumPy bits.
    W, expected = torch.linspace(-1, 1, 3), np.linspace(-1, 1, 3).astype(np.float32)
    opt, reference = af.Adam(lr=0.1), af.Adam(lr=0.1)
    opt.step(W, torch._efficientzerotensor(3))
    reference.step(expected, np.zeros(3, np.float32))
    np.testing.assert_array_equal(W.numpy(), expected)
    rng = np.random.default_rng(12)
    W, expected = torch.tensor(rng.random(1000, np.float32)), np.empty(1000, np.float32)
    expected[:] = W.numpy()
    with torch.inference_mode():
        g = torch.tensor(rng.random(1000, np.float32))
    opt.step(W, g)
    reference.step(expected, g.numpy())
    np.testing.assert_array_equal(W.numpy(), expected)


def test_a_moment_dtype_torch_lacks_is_refused_and_changes_nothing(torch: Any) -> None:
    if np.dtype(np.longdouble).name == "float64":
        pytest.skip("longdouble is float64 here")
    W = torch.ones(3)
    opt = af.Adam(moment_dtype="longdouble")
    with pytest.raises(TypeError, match=r"^AdamConfig.moment_dtype: float(96|128) is not a dtype"):
        opt.step(W, torch.ones(3))
    assert torch.equal(W, torch.ones(3)) and len(opt.m) == 0 and W._version == 0


def test_adam_step_refuses_tensors_that_share_memory(torch: Any) -> None:
    opt = af.Adam(lr=0.1)
    base = torch.zeros(4)
    with pytest.raises(ValueError, match=r"^params: expected an array whose elements share no"):
        opt.step(torch.zeros(1).expand(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"^params\[1\]: expected arrays that share no memory"):
        opt.step([base[:3], base[2:]], [torch.ones(3), torch.ones(2)])
    assert not torch.any(base) and len(opt.m) == 0


def test_tensors_no_view_can_show_take_the_generic_kernel(torch: Any) -> None:
    # bfloat16 has no NumPy dtype, and a negative view's memory holds the negated values.
    half = torch.linspace(-1, 1, 4, dtype=torch.bfloat16)
    negated = torch._neg_view(torch.linspace(-1, 1, 4, dtype=torch.float64))
    for W, dtype in [(half, np.float32), (negated, np.float64)]:
        expected = W.to(torch.float64).resolve_neg().numpy().astype(dtype)
        af.Adam(lr=0.1).step(expected, np.ones(4, dtype))
        af.Adam(lr=0.1).step(W, torch.ones(4, dtype=W.dtype))
        np.testing.assert_allclose(W.to(torch.float64).resolve_neg().numpy(), expected, rtol=1e-2)
    with pytest.raises(
        TypeError, match=r"^grads: expected a torch array like params, got a NumPy array"
    ):
        af.Adam(lr=0.1).step(torch.ones(3), np.ones(3))


def test_adam_step_refuses_an_inference_tensor_outside_inference_mode(torch: Any) -> None:
    with torch.inference_mode():
        W = torch.ones(3)
    opt = af.Adam(lr=0.1)
    with pytest.raises(TypeError, match=r"^params: expected a tensor that can be written in place"):
        opt.step(W, torch.ones(3))
    assert torch.equal(W, torch.ones(3)) and len(opt.m) == 0
    with torch.inference_mode():  # where torch lets it be written
        opt.step(W, torch.ones(3))
    assert not torch.equal(W, torch.ones(3))


def test_an_adam_that_stepped_tensors_pickles_and_resumes_bit_for_bit(torch: Any) -> None:
    import pickle

    W = torch.linspace(-1, 1, 5, dtype=torch.float64)
    opt = af.Adam(lr=0.1, amsgrad=True)
    opt.step(W, torch.ones(5, dtype=torch.float64))
    W2, opt2 = pickle.loads(pickle.dumps((W, opt)))
    assert type(opt2.m[id(W2)]) is torch.Tensor and opt2.t[id(W2)] == 1
    for _ in range(3):
        g = torch.linspace(0, 1, 5, dtype=torch.float64)
        opt.step(W, g)
        opt2.step(W2, g)
    assert torch.equal(W, W2) and torch.equal(opt.get_state(W).v_max, opt2.get_state(W2).v_max)
    alone = pickle.loads(pickle.dumps(opt))  # without its tensor: waits for the next new one
    fresh = W.clone()
    alone.step(fresh, g)
    opt.step(W, g)
    assert torch.equal(fresh, W)


def test_a_pickled_tensor_state_must_fit_its_array(torch: Any) -> None:
    from adam_functional._records import PICKLE_VERSION, unpickle

    W = torch.ones(3)
    opt = af.Adam(lr=0.1)
    opt.step(W, torch.ones(3))
    _, (_, _, fields) = opt.__reduce__()
    for array, got in [
        (np.ones(3, np.float32), r"ndarray of dtype float32 and shape \(3,\)"),
        (torch.ones(4), r"Tensor of dtype torch.float32 and shape \(4,\)"),
        (torch.ones(3, dtype=torch.int64), r"Tensor of dtype torch.int64 and shape \(3,\)"),
    ]:
        fields["slots"][0]["array"] = array
        expected = rf"slots\[0\]: expected its array to be a floating-point array of shape \(3,\) like its moments, got {got}$"
        with pytest.raises(ValueError, match=expected):
            unpickle(af.Adam, PICKLE_VERSION, fields)


def test_a_checkpoint_of_tensors_loads_as_numpy(torch: Any, tmp_path: Any) -> None:
    pytest.importorskip("safetensors", reason="checkpoint files need safetensors")
    from adam_functional import checkpoint, tree_map

    config = AdamConfig(lr=0.1, amsgrad=True)
    params = {"w": torch.linspace(-1, 1, 4, dtype=torch.float64)}
    params, state = adam_update(
        params, {"w": torch.ones(4, dtype=torch.float64)}, adam_init(params, config), config
    )
    path = tmp_path / "torch.ckpt"
    checkpoint.save(path, {"params": params, "state": state})
    loaded = checkpoint.load(path)
    assert isinstance(loaded["params"]["w"], np.ndarray) and loaded["state"].t == 1
    np.testing.assert_array_equal(loaded["state"].v_max["w"], state.v_max["w"].numpy())
    back = tree_map(torch.tensor, loaded["state"])
    assert isinstance(back.m["w"], torch.Tensor) and back.t == 1


_NOT_DENSE = {
    "sparse": (lambda t, x: x.to_sparse(), r"layout torch\.sparse_coo; convert it with to_dense"),
    "sparse_csr": (lambda t, x: x.to_sparse_csr(), r"layout torch\.sparse_csr"),
    "mkldnn": (lambda t, x: x.float().to_mkldnn(), r"layout torch\._mkldnn"),
    "meta": (lambda t, x: x.to("meta"), r"on the meta device, which holds no values"),
    "nested": (
        lambda t, x: t.nested.nested_tensor(list(x)),
        r"a nested tensor; give each of its tensors as a leaf",
    ),
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("kind", sorted(_NOT_DENSE))
@pytest.mark.parametrize("where", ["params", "grads", "state"])
def test_tensors_without_dense_values_are_refused_by_name(
    torch: Any, kind: str, where: str
) -> None:
    make, message = _NOT_DENSE[kind]
    p, g = torch.ones(2, 3, dtype=torch.float64), torch.full((2, 3), 0.5, dtype=torch.float64)
    odd = make(torch, p.clone())
    opt = af.Adam()
    if where == "state":
        with pytest.raises(TypeError, match=rf"^AdamState\.m: expected a dense tensor.*{message}"):
            af.AdamState(m=odd, v=odd, t=0)
        return
    args = {"params": (odd, g), "grads": (p, odd)}[where]
    pattern = (
        rf"^{where}: expected a dense tensor with values \(layout torch\.strided\), got .*{message}"
    )
    calls = [lambda: adam_update(*args, adam_init(p), AdamConfig()), lambda: opt.step(*args)]
    if where == "params":
        calls.append(lambda: adam_init(odd))
    for call in calls:
        with pytest.raises(TypeError, match=pattern):
            call()
    assert torch.equal(p, torch.ones(2, 3, dtype=torch.float64)) and not opt.m


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_tensors_are_refused_by_name(torch: Any, name: str) -> None:
    dtype = getattr(torch, name)
    p, odd = torch.ones(3, dtype=torch.float32), torch.ones(3).to(dtype)
    message = rf"expected a floating-point dtype of 16 bits or more, got torch\.{name}"
    opt = af.Adam()
    for where, call in [
        ("params", lambda: adam_init(odd)),
        ("params", lambda: opt.step(odd, odd)),
        ("grads", lambda: adam_update(p, odd, adam_init(p), AdamConfig())),
        (r"AdamState\.m", lambda: af.AdamState(m=odd, v=odd, t=0)),
    ]:
        with pytest.raises(TypeError, match=rf"^{where}: {message}"):
            call()
    assert not opt.m


def test_torch_func_vmap_over_the_update_selects_rows_with_skip(torch: Any) -> None:
    # Under vmap no Python branch may depend on a value: "raise" is refused by name, as under
    # jax.jit, and "skip" selects row by row with where.
    p = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    g = torch.full((4, 3), 0.5, dtype=torch.float64)
    g[2, 1] = float("nan")

    def step(config: AdamConfig) -> Any:
        def one(pi: Any, gi: Any) -> Any:
            new_p, state = adam_update(pi, gi, adam_init(pi, config), config)
            return new_p, state.m

        return torch.func.vmap(one)(p, g)

    with pytest.raises(TypeError, match=r"^params: nonfinite='raise' cannot raise inside a trac"):
        step(AdamConfig(lr=0.1))
    new_p, m = step(AdamConfig(lr=0.1, nonfinite="skip"))
    for row in (0, 1, 3):
        expected, state = adam_update(p[row], g[row], adam_init(p[row]), AdamConfig(lr=0.1))
        assert torch.equal(new_p[row], expected) and torch.equal(m[row], state.m)
    assert torch.equal(new_p[2], p[2]) and not torch.any(m[2])
