"""PyTorch: adam_update returns new tensors; Adam.step writes tensors and nn.Parameters in place.

Only the CPU is tested here; tensors on another device take the same generic kernel, which
array-api-strict's device (see ``test_array_api.py``) holds to the array API.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_array_api import RTOL, STEPS, load_library

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
    np.testing.assert_allclose(new_p.numpy(), expected, rtol=RTOL, atol=0)


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
    # The NumPy wrapper computes the bias corrections in float64 too: the same numbers.
    np.testing.assert_allclose(W.numpy(), expected, rtol=RTOL, atol=0)
    np.testing.assert_allclose(m.numpy(), reference.m[id(expected)], rtol=RTOL, atol=0)


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
    np.testing.assert_allclose(base.T.numpy(), expected, rtol=RTOL, atol=0)


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
