"""The pure update: `adam_init` and `adam_update`, and the checks they share.

Every check runs before any arithmetic, so a call that raises has computed nothing, and since the
pure update writes only arrays it has just made, its inputs are never touched in any case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from adam_functional import _kernels, _tree
from adam_functional._records import AdamConfig, AdamState
from adam_functional._tree import LeafPaths

__all__ = ["adam_init", "adam_update"]

_FLOAT_PARAMS = "a floating-point array (float16, float32, float64 or longdouble)"


def check_params(leaves: Sequence[np.ndarray], paths: LeafPaths) -> None:
    """Raises ``TypeError`` unless every parameter is a floating-point array."""
    for index, leaf in enumerate(leaves):
        if leaf.dtype.kind != "f":
            raise TypeError(f"{paths[index]}: expected {_FLOAT_PARAMS}, got dtype {leaf.dtype}")


def as_grad(g: Any, p: np.ndarray, path: LeafPaths, index: int) -> np.ndarray:
    """Returns gradient leaf ``g`` as an array after checking it against its parameter ``p``.

    Raises:
      TypeError: ``g`` is not an array or real scalar, or holds no real numbers.
      ValueError: its shape is not exactly that of ``p`` (nothing is ever broadcast).
    """
    if not isinstance(g, np.ndarray):
        if isinstance(g, bool | np.bool_) or not isinstance(
            g, float | int | np.floating | np.integer
        ):
            raise TypeError(
                f"{path[index]}: expected an array of real numbers, got {type(g).__name__}"
            )
        g = np.asarray(g)
    array: np.ndarray = g
    if array.dtype.kind not in "fiu":
        raise TypeError(
            f"{path[index]}: expected real numbers (a float or int dtype), got dtype {array.dtype}"
        )
    if array.shape != p.shape:
        raise ValueError(f"{path[index]}: expected shape {p.shape} like params, got {array.shape}")
    return array


def check_moment(x: Any, p: np.ndarray, path: LeafPaths, index: int) -> None:
    """Raises ``ValueError`` unless state leaf ``x`` has the shape and dtype of parameter ``p``."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{path[index]}: expected an array like params, got {type(x).__name__}")
    if x.shape != p.shape or x.dtype != p.dtype:
        raise ValueError(
            f"{path[index]}: expected dtype {p.dtype} and shape {p.shape} like params, got dtype "
            f"{x.dtype} and shape {x.shape}; was this state made for other params?"
        )


def find_bad_gradient(
    grads: Sequence[np.ndarray], params: Sequence[np.ndarray]
) -> tuple[int, str] | None:
    """Returns the index of the first gradient holding NaN, infinity or a value whose square
    overflows, with a description of what it holds; or None when all are fine."""
    for index, (g, p) in enumerate(zip(grads, params)):
        problem = _kernels.gradient_problem(g, p.dtype)
        if problem is not None:
            return index, problem
    return None


def may_skip(config: AdamConfig, streak: int) -> bool:
    """Whether a step with bad gradients may be skipped as the ``streak``-th in a row."""
    if config.nonfinite != "skip":
        return False
    return config.max_consecutive_skips is None or streak <= config.max_consecutive_skips


def nonfinite_error(problem: str, path: str, config: AdamConfig, streak: int) -> FloatingPointError:
    """The error for a gradient at ``path`` that holds what ``problem`` describes."""
    if config.nonfinite == "skip":
        advice = (
            f"it would be skip {streak} in a row, more than "
            f"AdamConfig.max_consecutive_skips={config.max_consecutive_skips}"
        )
    else:
        advice = "AdamConfig(nonfinite='skip') skips such steps"
    return FloatingPointError(
        f"{path}: expected finite gradients, got {problem}; nothing was changed. {advice}"
    )


def _require(value: Any, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name}: expected an {kind.__name__}, got {type(value).__name__}")


def _frozen_zeros(leaf: np.ndarray) -> np.ndarray:
    zeros = np.zeros(leaf.shape, leaf.dtype)
    zeros.flags.writeable = False
    return zeros


def adam_init(params: Any, config: AdamConfig | None = None) -> AdamState:
    """Returns the state of Adam before its first step: zero moments shaped like ``params``.

    Args:
      params: a floating-point NumPy array, or a tree of them: nested dicts, lists, tuples and
        namedtuples with arrays at the leaves.
      config: with ``amsgrad=True`` the state also holds ``v_max``; the default config does not.

    Returns:
      An `AdamState` with ``t=0`` whose read-only ``m`` and ``v`` mirror ``params`` in
      structure, shapes and dtypes.

    Raises:
      TypeError: a leaf is not a floating-point array, or ``config`` is not an ``AdamConfig``.

    Examples:
      >>> import numpy as np
      >>> adam_init({"w": np.ones((2, 3)), "b": np.zeros(3, np.float32)})
      AdamState(t=0, skipped=0, consecutive_skips=0, m={'w': float64[2, 3], 'b': float32[3]}, \
v={'w': float64[2, 3], 'b': float32[3]}, v_max=None)
    """
    if config is None:
        config = AdamConfig()
    _require(config, AdamConfig, "config")
    leaves, treedef = _tree.flatten(params, "params")
    check_params(leaves, LeafPaths(treedef, "params"))

    def zeros() -> Any:
        return _tree.unflatten(treedef, [_frozen_zeros(leaf) for leaf in leaves])

    return AdamState._trusted(zeros(), zeros(), 0, zeros() if config.amsgrad else None, 0, 0)


def adam_update(
    params: Any, grads: Any, state: AdamState, config: AdamConfig
) -> tuple[Any, AdamState]:
    r"""Takes one Adam step: returns new parameters and a new state, and changes nothing.

    With ``t = state.t + 1`` and every operation elementwise, in this order (the notebook's):

    ```text
    g     = -g                               if maximize
    g     = g + weight_decay * p             if weight_decay > 0 and not decoupled (L2)
    p     = p * (1 - lr(t) * weight_decay)   if decoupled_weight_decay (AdamW)
    m     = beta1 * m + (1 - beta1) * g
    v     = beta2 * v + (1 - beta2) * g**2
    v_max = max(v_max, v)                    if amsgrad (and v_max replaces v below)
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    p     = p - lr(t) * m_hat / (sqrt(v_hat) + eps)
    ```

    This is Algorithm 1 of Kingma & Ba with the notebook's placement of ``eps`` (outside the
    square root, after bias correction, as in ``torch.optim.Adam`` and ``optax.adam``). In
    float64 the results are bit-for-bit those of the notebook's class. float16 parameters are
    computed in float32 and rounded back; moments keep the parameters' dtype.

    The function is pure: it writes none of its arguments, the new parameters are fresh arrays,
    and the new state's arrays are fresh and read-only. A skipped step (``nonfinite="skip"``)
    returns copies of the parameters and a state that shares the old state's read-only moments.

    Args:
      params: a floating-point array, or a tree of them (nested dicts, lists, tuples,
        namedtuples). Each leaf keeps its dtype (float16, float32, float64, longdouble).
      grads: the gradients, a tree with the structure of ``params`` whose leaves have exactly the
        shapes of the parameters (never broadcast) and real dtypes (cast to the parameters').
      state: from `adam_init` or a previous call, made for parameters of this structure.
      config: the hyperparameters.

    Returns:
      ``(new_params, new_state)``: ``new_params`` has the structure and container types of
      ``params``; ``new_state.t == state.t + 1`` unless the step was skipped.

    Raises:
      ValueError: ``grads`` or the state differ from ``params`` in structure, shape or dtype
        (the message names the path), or a schedule returned an invalid rate.
      TypeError: a parameter is not floating point, a gradient holds no real numbers, or
        ``state``/``config`` are not an ``AdamState``/``AdamConfig``.
      FloatingPointError: a gradient holds NaN or infinity and ``config.nonfinite == "raise"``.

    Examples:
      >>> import numpy as np
      >>> params = {"w": np.array([1.0, -2.0])}
      >>> config = AdamConfig(lr=0.1)
      >>> state = adam_init(params)
      >>> params, state = adam_update(params, {"w": np.array([0.5, -0.5])}, state, config)
      >>> params["w"], state.t
      (array([ 0.9, -1.9]), 1)

    References:
      Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014,
      https://arxiv.org/abs/1412.6980
    """
    _require(state, AdamState, "state")
    _require(config, AdamConfig, "config")
    p_leaves, treedef = _tree.flatten(params, "params")
    check_params(p_leaves, LeafPaths(treedef, "params"))
    g_leaves = _tree.flatten_like(grads, treedef, "grads")
    moments = [
        (name, _tree.flatten_like(tree, treedef, f"state.{name}"))
        for name, tree in (("m", state.m), ("v", state.v), ("v_max", state.v_max))
        if tree is not None
    ]
    if config.amsgrad != (state.v_max is not None):
        raise ValueError(
            f"state.v_max: expected {'arrays' if config.amsgrad else 'None'} with "
            f"amsgrad={config.amsgrad}, got {'None' if state.v_max is None else 'arrays'}; "
            "make the state with adam_init(params, config)"
        )
    g_paths = LeafPaths(treedef, "grads")
    grads_arrays = [as_grad(g, p, g_paths, i) for i, (g, p) in enumerate(zip(g_leaves, p_leaves))]
    for name, leaves in moments:
        m_paths = LeafPaths(treedef, f"state.{name}")
        for index, (x, p) in enumerate(zip(leaves, p_leaves)):
            check_moment(x, p, m_paths, index)

    if config.nonfinite != "propagate":
        bad = find_bad_gradient(grads_arrays, p_leaves)
        if bad is not None:
            index, problem = bad
            streak = state.consecutive_skips + 1
            if not may_skip(config, streak):
                raise nonfinite_error(problem, g_paths[index], config, streak)
            copies = _tree.unflatten(treedef, [np.array(p, copy=True) for p in p_leaves])
            return copies, AdamState._trusted(
                state.m, state.v, state.t, state.v_max, state.skipped + 1, streak
            )

    t = state.t + 1
    c = _kernels.coefficients(config, t)
    m_leaves, v_leaves = moments[0][1], moments[1][1]
    vm_leaves = moments[2][1] if config.amsgrad else [None] * len(p_leaves)
    kernel = _kernels.prepare()
    new_p, new_m, new_v, new_vm = [], [], [], []
    # The checks have run: whatever the arithmetic meets now (an underflow, or the NaN it was
    # asked to propagate) must not interrupt the step half-way, warning or not.
    with np.errstate(all="ignore"):
        for p, g, m, v, vm in zip(p_leaves, grads_arrays, m_leaves, v_leaves, vm_leaves):
            shape, dtype = p.shape, p.dtype
            out_p, out_m, out_v = (
                np.empty(shape, dtype),
                np.empty(shape, dtype),
                np.empty(shape, dtype),
            )
            out_vm = None if vm is None else np.empty(shape, dtype)
            kernel(p, g, m, v, vm, c, out_p, out_m, out_v, out_vm)
            out_m.flags.writeable = False
            out_v.flags.writeable = False
            if out_vm is not None:
                out_vm.flags.writeable = False
            new_p.append(out_p)
            new_m.append(out_m)
            new_v.append(out_v)
            new_vm.append(out_vm)
    return _tree.unflatten(treedef, new_p), AdamState._trusted(
        _tree.unflatten(treedef, new_m),
        _tree.unflatten(treedef, new_v),
        t,
        _tree.unflatten(treedef, new_vm) if config.amsgrad else None,
        state.skipped,
        0,
    )
