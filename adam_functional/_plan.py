"""The planner: every structural decision of a step, made once into an immutable `Plan`.

Both APIs plan a step here before it looks at a value: what each leaf is (a NumPy array, a CPU
tensor seen through a NumPy view, another library's array for the array-API kernel), its
moments' dtype and kernel, the groups the kernels run in and how each group's gradients are
checked, whether an in-place write is legal, and whether each state fits its parameter. Every
structural check lives here (`build`); a plan kept from an earlier step is taken again only
when `guard` says it still fits the arrays of this call. ``adam_functional._step`` then executes
any plan, so a check added here holds for every route.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from adam_functional import kernels
from adam_functional._arrays import (
    describe,
    is_foreign,
    is_lazy,
    is_traced,
    library,
    namespace,
    one_library,
    plain,
    refuse_unsupported,
    views,
)
from adam_functional._memory import copy_overlapping, owner, refuse_overlaps
from adam_functional._records import AdamConfig
from adam_functional._tree import MAX_DEPTH, LeafPaths, TreeDef, broadcast_prefix, leaf_count
from adam_functional.kernels import Kernel
from adam_functional.kernels import numpy as reference

__all__ = [
    "BATCH_LEAF",
    "BATCH_SIZE",
    "Checked",
    "Group",
    "LeafState",
    "Plan",
    "build",
    "configs_for",
    "guard",
    "keep_one",
    "kept_one",
    "moments_dtype",
]

_FLOAT_PARAMS = "a floating-point array (float16, float32, float64 or longdouble)"
#: Leaves of at most this many elements are stepped together by the pure update: gathered into
#: one flat batch of at most `BATCH_SIZE` elements per dtype and config, on which the kernel runs
#: once. A kernel call costs the same few microseconds whatever its length, so a tree of many
#: small arrays pays it per batch, not per leaf.
BATCH_LEAF = 1 << 13
#: The largest batch: half a block of the NumPy kernel, whose gathered inputs stay in cache.
BATCH_SIZE = 1 << 14
_SMALL_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))


class LeafState(NamedTuple):
    """What a step reads of one parameter's state.

    ``origin`` says where the moments came from, for the error when they do not fit the
    parameter (``"as at its first step"``); None when they have been checked to fit.
    """

    m: Any
    v: Any
    v_max: Any
    t: Any  # An int; a 0-d integer array under jax.jit.
    consecutive_skips: Any
    origin: str | None


class Group(NamedTuple):
    """Leaves that one kernel call steps, and how their gradients are checked first."""

    leaves: tuple[int, ...]
    #: The NumPy kernel; None for the array-API kernel.
    kernel: Kernel | None
    #: ``"small"``: the kernel of a few elements checks as it computes; ``"leaf"``: each leaf's
    #: quick test; ``"batch"``: one quick test of the gathered gradients; ``"array"``: a
    #: reduction of another library's concrete arrays; ``"where"``: under tracing (or on dask),
    #: a 0-d flag selected with ``where``; ``"none"``: ``nonfinite="propagate"``.
    check: str


class Plan(NamedTuple):
    """What a step decides from the leaves' kinds, dtypes, shapes and configs."""

    #: The namespace of another library's arrays (the array-API kernel), or None.
    xp: Any
    moments: tuple[Any, ...]
    groups: tuple[Group, ...]
    #: What `guard` compares: the parameters' and gradients' (shape, dtype) and the configs.
    shapes: tuple[Any, ...]
    grads: tuple[Any, ...]
    configs: tuple[AdamConfig, ...]
    in_place: bool
    #: `kernels.selection` when it was made.
    selection: tuple[object, int]
    #: For a one-group ``"small"`` plan, the scalars its config fixes (`kernels.constants`).
    small: tuple[float, ...] | None


class Checked(NamedTuple):
    """A step's arrays as its kernels read them, checked against its plan."""

    plan: Plan
    params: list[Any]
    grads: list[Any]
    states: list[LeafState | None]
    #: The paths of the leaves, for errors.
    paths: LeafPaths
    #: The caller's tensors, when the kernels read and write NumPy views of them; else None.
    tensors: list[Any] | None = None


def configs_for(config: Any, treedef: TreeDef) -> list[AdamConfig]:
    """One config per leaf, from one `AdamConfig` or a tree of them that prefixes the params.

    Raises:
      TypeError: ``config`` is neither an `AdamConfig` nor a tree of them.
      ValueError: the tree does not fit the params; the message names the path.
    """
    if type(config) is AdamConfig:
        return [config] * leaf_count(treedef)
    if not _holds_config(config, 0):
        hint = " (a dict of hyperparameters: AdamConfig(**it))" if isinstance(config, dict) else ""
        raise TypeError(
            f"config: expected an AdamConfig, got {type(config).__name__}{hint}; or a tree of "
            "AdamConfigs that is a prefix of params"
        )
    return broadcast_prefix(config, treedef, "config", AdamConfig)


def _holds_config(node: Any, depth: int) -> bool:
    if isinstance(node, AdamConfig):
        return True
    if depth > MAX_DEPTH or not isinstance(node, dict | list | tuple):
        return False
    values = node.values() if isinstance(node, dict) else node
    return any(_holds_config(value, depth + 1) for value in values)


# -------------------------------------------------------------------------------------------------
# The one-array plan, kept by config, shape and dtypes.

# By (id(config), shape, dtypes, in_place, amsgrad): a weak reference to the config (which says
# whether the id still names it) and the plan; cleared when it grows past a few.
_ONE: dict[tuple[Any, ...], tuple[Any, Plan]] = {}


def _one_key(p: np.ndarray, g: np.ndarray, state: Any, config: AdamConfig, in_place: bool) -> Any:
    moments = None if state is None else state.m
    m_dtype = moments.dtype if type(moments) is np.ndarray else None
    return (id(config), p.shape, p.dtype, g.dtype, m_dtype, in_place)


def kept_one(p: Any, g: Any, state: LeafState, config: AdamConfig, in_place: bool) -> Any:
    """The kept plan of a step of one NumPy array, checked, where `guard` says it fits; else
    None (the step is planned by `build`, and `keep_one` keeps the plan)."""
    if type(p) is not np.ndarray or type(g) is not np.ndarray:
        return None
    kept = _ONE.get(_one_key(p, g, state, config, in_place))
    if kept is None or kept[0]() is not config or not guard(kept[1], [p], [g], [state]):
        return None
    return Checked(kept[1], [p], [g], [state], _ONE_PATHS)


def keep_one(checked: Checked, state: Any, config: AdamConfig) -> None:
    """Keeps the plan of a step of one NumPy array for `kept_one`."""
    plan = checked.plan
    if plan.xp is not None or checked.tensors is not None or len(checked.params) != 1:
        return
    if len(_ONE) >= 64:
        _ONE.clear()
    key = _one_key(checked.params[0], checked.grads[0], state, config, plan.in_place)
    _ONE[key] = (weakref.ref(config), plan)


_ONE_PATHS = LeafPaths(None, "params")


def guard(plan: Plan, params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any]) -> bool:
    """Whether a kept NumPy ``plan`` still fits the arrays of this call: the same shapes and
    dtypes, the same kernels, states that fit (moments of the planned dtype and shape), and, in
    place, arrays that can be written and that share no memory with one another. False sends
    the step to `build`, which says what is wrong."""
    if not kernels.same_selection(plan.selection) or len(params) != len(plan.shapes):
        return False
    for p, g, state, shape, g_dtype, m_dtype in zip(
        params, grads, states, plan.shapes, plan.grads, plan.moments
    ):
        if type(p) is not np.ndarray or type(g) is not np.ndarray:
            return False
        if (p.shape, p.dtype) != shape or g.shape != p.shape or g.dtype != g_dtype:
            return False
        if state is not None:
            m, v = state.m, state.v
            if type(m) is not np.ndarray or type(v) is not np.ndarray:
                return False
            if m.shape != p.shape or m.dtype != m_dtype or v.shape != m.shape or v.dtype != m_dtype:
                return False
            if (state.v_max is None) == plan.configs[0].amsgrad:
                return False
        if plan.in_place:
            flags = p.flags
            if not (flags.writeable and flags.c_contiguous):
                return False
            mine, theirs = owner(p), owner(g)
            if mine is None or theirs is None or mine is theirs:
                return False
    return not plan.in_place or len(params) == 1


# -------------------------------------------------------------------------------------------------
# The planner.


def build(
    leaves: list[Any],
    treedef: TreeDef,
    g_leaves: list[Any],
    states: Sequence[LeafState | None],
    configs: Sequence[AdamConfig],
    *,
    in_place: bool,
    batched: bool = False,
    kept: Plan | None = None,
) -> Checked:
    """Checks the structure of a step over the parameter ``leaves`` (of the tree ``treedef``,
    None for one array) and their gradient leaves, and plans it.

    ``states`` and ``configs`` have one entry per leaf: its moments and counts (or None for a
    parameter that starts from zero moments), and its hyperparameters. A state whose ``origin``
    is None has been checked against its parameter by the caller. ``in_place`` says the kernels
    will write the parameters themselves, which must then be writeable and overlap nothing.
    ``batched`` (the pure update) groups the small leaves into batches. ``kept``, the plan of the
    previous step over these parameters and configs, is taken again where dtypes and kernels
    are the same.

    Raises:
      TypeError: a parameter is not a floating-point (writeable) array, a gradient holds no
        real numbers, or the leaves are arrays of more than one library.
      ValueError: the gradients differ from the parameters in shape, a state does not fit its
        parameter, or parameters overlap (in place).
    """
    paths = LeafPaths(treedef, "params")
    g_paths = paths.renamed("grads")
    if not all(type(p) is np.ndarray for p in leaves):
        lib = one_library(leaves, paths, g_leaves)
        if lib != "numpy":  # Other libraries' arrays need array-api-compat, viewed or not.
            namespace(leaves[0], paths[0])
        if lib == "torch":
            held = [None if s is None else (s.m, s.v, s.v_max) for s in states]
            seen = views(leaves, g_leaves, held, pure=not in_place)
            if seen is not None:
                viewed = [
                    None if s is None or m is None else s._replace(m=m[0], v=m[1], v_max=m[2])
                    for s, m in zip(states, seen.moments)
                ]
                checked = build(
                    seen.params, treedef, seen.grads, viewed, configs, in_place=in_place
                )
                return checked._replace(tensors=leaves)
        if lib != "numpy":
            return _build_array_api(leaves, g_leaves, states, configs, in_place, paths)
    params = [p if type(p) is np.ndarray else plain(p) for p in leaves]
    for index, p in enumerate(params):
        if p.dtype.kind != "f":
            raise TypeError(f"{paths[index]}: expected {_FLOAT_PARAMS}, got dtype {p.dtype}")
        if in_place and not p.flags.writeable:
            raise TypeError(
                f"{paths[index]}: expected a writeable array to update in place, got a read-only "
                "array"
            )
    if in_place:
        refuse_overlaps(params, leaves, paths)
    grads = []
    for index, (g, p) in enumerate(zip(g_leaves, params)):
        if type(g) is not np.ndarray or g.shape != p.shape or g.dtype.kind not in "fiu":
            g = _as_grad(g, p, g_paths, index)
        grads.append(g)
    if kept is not None and (
        not kernels.same_selection(kept.selection)
        or any(g.dtype != dtype for g, dtype in zip(grads, kept.grads))
    ):
        kept = None
    moments: tuple[Any, ...] = (
        kept.moments
        if kept is not None
        else tuple(config.moments_dtype(p.dtype) for p, config in zip(params, configs))
    )
    for index, state in enumerate(states):
        if state is not None and state.origin is not None:
            check_fit(state, params[index], moments[index], configs[index], paths, index)
    if in_place:
        copy_overlapping(grads, params)
    if kept is None:
        kept = _plan_numpy(params, grads, moments, configs, in_place, batched)
    return Checked(kept, params, grads, list(states), paths)


def _plan_numpy(
    params: list[np.ndarray],
    grads: list[np.ndarray],
    moments: tuple[np.dtype, ...],
    configs: Sequence[AdamConfig],
    in_place: bool,
    batched: bool,
) -> Plan:
    """The plan of a step of NumPy arrays (or views): its kernels, groups and checks."""
    total = sum(p.size for p in params)
    chosen = [
        kernels.select(p.dtype, g.dtype, dtype, total)
        for p, g, dtype in zip(params, grads, moments)
    ]
    small = None
    if len(params) == 1:
        small = _small(params[0], grads[0], moments[0], configs[0])
    if small is not None:
        groups: tuple[Group, ...] = (Group((0,), chosen[0], "small"),)
    elif not batched or len(params) == 1:
        groups = tuple(
            Group((index,), kernel, _leaf_check(config))
            for index, (kernel, config) in enumerate(zip(chosen, configs))
        )
    else:
        groups = _batches(params, grads, moments, configs, chosen)
    return Plan(
        None,
        moments,
        groups,
        tuple((p.shape, p.dtype) for p in params),
        tuple(g.dtype for g in grads),
        tuple(configs),
        in_place,
        kernels.selection(),
        small,
    )


def _leaf_check(config: AdamConfig) -> str:
    return "none" if config.nonfinite == "propagate" else "leaf"


def _small(p: np.ndarray, g: np.ndarray, moments: np.dtype, config: AdamConfig) -> Any:
    """The constant scalars of a step that the kernel of a few elements takes (a float64 or
    float32 array of at most `kernels.numpy.SCALAR_SIZE` elements, gradients and moments of
    its dtype, a constant learning rate and no option but L2 weight decay); else None."""
    if (
        p.size > reference.SCALAR_SIZE
        or p.dtype not in _SMALL_DTYPES
        or g.dtype != p.dtype
        or moments != p.dtype
        or not p.flags.c_contiguous
        or type(config.lr) is not float
    ):
        return None
    return kernels.constants(config)


def _batches(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    moments: Sequence[np.dtype],
    configs: Sequence[AdamConfig],
    chosen: Sequence[Kernel],
) -> tuple[Group, ...]:
    """The leaves of a pure NumPy step in groups: one kernel call each.

    Leaves of at most `BATCH_LEAF` elements whose parameters, gradients and moments share one
    dtype, the one the step computes in, and whose config (hence scalars: the pure update's
    leaves share one count) and kernel are the same go together, up to `BATCH_SIZE` elements;
    every other leaf is a group of its own. A batch whose config allows one quick test of its
    gathered gradients (no L2 decay, which changes what is squared) is checked so.
    """
    groups: list[tuple[list[int], Any, AdamConfig]] = []
    open_groups: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    for index, (p, g, dtype_m, config, kernel) in enumerate(
        zip(params, grads, moments, configs, chosen)
    ):
        size, dtype = p.size, p.dtype
        if (
            size > BATCH_LEAF
            or g.dtype != dtype
            or dtype_m != dtype
            or kernels.work_dtype(dtype, dtype_m) != dtype
        ):
            groups.append(([index], kernel, config))
            continue
        key = (dtype, id(config), kernel)
        found = open_groups.get(key)
        if found is None or found[1][0] + size > BATCH_SIZE:
            found = open_groups[key] = ([], [0])
            groups.append((found[0], kernel, config))
        found[0].append(index)
        found[1][0] += size
    planned = []
    for members, kernel, config in groups:
        check = _leaf_check(config)
        l2 = config.weight_decay > 0 and not config.decoupled_weight_decay
        if len(members) > 1 and check == "leaf" and not l2:  # L2 changes what is squared.
            check = "batch"
        planned.append(Group(tuple(members), kernel, check))
    return tuple(planned)


def check_fit(
    state: LeafState, p: Any, moments: Any, config: AdamConfig, paths: LeafPaths, index: int
) -> None:
    """Refuses a state (of the wrapper, with its ``origin``) that does not fit parameter ``p``."""
    # Paths are formatted only for an error: formatting them all costs more than the checks.
    if isinstance(p, np.ndarray) and not all(
        x is None or isinstance(x, np.ndarray) for x in (state.m, state.v, state.v_max)
    ):
        raise ValueError(
            f"{paths[index]}: expected NumPy moments for a NumPy array {state.origin}, got "
            f"{describe(state.m)}"
        )
    if tuple(state.m.shape) != tuple(p.shape):
        raise ValueError(
            f"{paths[index]}: expected dtype {p.dtype} and shape {tuple(state.m.shape)} "
            f"{state.origin}, got dtype {p.dtype} and shape {tuple(p.shape)}"
        )
    if state.m.dtype != moments:
        raise ValueError(
            f"{paths[index]}: expected moments of dtype {moments} for {p.dtype} parameters with "
            f"moment_dtype={config.moment_dtype!r}, got a state of {state.m.dtype} moments "
            f"{state.origin}"
        )
    if config.amsgrad != (state.v_max is not None):
        raise ValueError(
            f"{paths[index]}: expected a state {'with' if config.amsgrad else 'without'} v_max for "
            f"amsgrad={config.amsgrad}, got one {'without' if config.amsgrad else 'with'} "
            f"{state.origin}"
        )


# -------------------------------------------------------------------------------------------------
# Parameters and gradients.


def _as_grad(g: Any, p: np.ndarray, paths: LeafPaths, index: int) -> np.ndarray:
    """Returns gradient leaf ``g`` as a plain array after checking it against parameter ``p``."""
    if type(g) is np.ndarray:
        pass
    elif isinstance(g, np.ndarray):
        g = plain(g)
    else:
        if is_foreign(g):
            one_library([p], paths.renamed("params"), [g])
        if isinstance(g, bool | np.bool_) or not isinstance(
            g, float | int | np.floating | np.integer
        ):
            raise TypeError(
                f"{paths[index]}: expected an array of real numbers, got {type(g).__name__}"
            )
        g = np.asarray(g)
    array: np.ndarray = g
    if array.dtype.kind not in "fiu":
        raise TypeError(
            f"{paths[index]}: expected real numbers (a float or int dtype), got dtype {array.dtype}"
        )
    if array.shape != p.shape:
        raise ValueError(f"{paths[index]}: expected shape {p.shape} like params, got {array.shape}")
    return array


# -------------------------------------------------------------------------------------------------
# Arrays of other libraries, through the array API.


def moments_dtype(xp: Any, params_dtype: Any, config: AdamConfig) -> Any:
    """`AdamConfig.moments_dtype` for a dtype of namespace ``xp``.

    Raises:
      TypeError: the config names a dtype that ``xp`` does not have.
    """
    chosen = config.moment_dtype
    if chosen == "params":
        return params_dtype
    if chosen is None:
        # float16 is no standard dtype: a namespace need not have it (and NumPy's dtypes equal
        # None: np.dtype(None) is float64).
        half = getattr(xp, "float16", None)
        if half is None and isinstance(params_dtype, np.dtype):
            half = np.dtype(np.float16)  # dask's namespace lists no float16; its arrays have it.
        return xp.float32 if half is not None and params_dtype == half else params_dtype
    found = getattr(xp, np.dtype(chosen).name, None)
    if found is None:
        raise TypeError(f"AdamConfig.moment_dtype: {chosen} is not a dtype of {xp.__name__}")
    return found


def _build_array_api(
    leaves: list[Any],
    g_leaves: list[Any],
    states: Sequence[LeafState | None],
    configs: Sequence[AdamConfig],
    in_place: bool,
    paths: LeafPaths,
) -> Checked:
    """`build` for the arrays of one library other than NumPy."""
    lib = library(leaves[0])
    xp = namespace(leaves[0], paths[0])
    g_paths = paths.renamed("grads")
    moments = []
    for index, (p, g, config) in enumerate(zip(leaves, g_leaves, configs)):
        refuse_unsupported(p, paths[index])
        if not xp.isdtype(p.dtype, "real floating"):
            raise TypeError(f"{paths[index]}: expected {_FLOAT_PARAMS}, got dtype {p.dtype}")
        if in_place:
            _writeable(p, lib, paths[index])
        refuse_unsupported(g, g_paths[index])
        if not xp.isdtype(g.dtype, ("real floating", "integral")):
            raise TypeError(
                f"{g_paths[index]}: expected real numbers (a float or int dtype), got dtype "
                f"{g.dtype}"
            )
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"{g_paths[index]}: expected shape {tuple(p.shape)} like params, got "
                f"{tuple(g.shape)}"
            )
        moments.append(moments_dtype(xp, p.dtype, config))
    for index, (state, p) in enumerate(zip(states, leaves)):
        if state is not None and state.origin is not None:
            check_fit(state, p, moments[index], configs[index], paths, index)
    lazy = any(is_lazy(a) for a in (*leaves, *g_leaves))
    groups = []
    for index, (p, g, config) in enumerate(zip(leaves, g_leaves, configs)):
        groups.append(Group((index,), None, _array_check(config, lazy, p, g, paths[index])))
    plan = Plan(
        xp,
        tuple(moments),
        tuple(groups),
        tuple((tuple(p.shape), p.dtype) for p in leaves),
        tuple(g.dtype for g in g_leaves),
        tuple(configs),
        in_place,
        kernels.selection(),
        None,
    )
    return Checked(plan, list(leaves), list(g_leaves), list(states), paths)


def _writeable(p: Any, lib: str, where: str) -> None:
    if lib in ("jax", "dask"):
        raise TypeError(
            f"{where}: {lib} arrays cannot be updated in place; "
            "adam_update(params, grads, state, config) returns new ones"
        )
    if lib == "torch":
        import torch

        if p.is_inference() and not torch.is_inference_mode_enabled():
            raise TypeError(
                f"{where}: expected a tensor that can be written in place, got an inference "
                "tensor (made under torch.inference_mode()); step a clone of it"
            )


def _array_check(config: AdamConfig, lazy: bool, p: Any, g: Any, where: str) -> str:
    """How the array-API step checks a leaf's gradient, decided from its config and arrays."""
    policy = config.nonfinite
    if policy == "propagate":
        return "none"
    if policy == "raise" and (is_traced(p) or is_traced(g)):
        raise TypeError(
            f"{where}: nonfinite='raise' cannot raise inside a traced function (jax.jit, vmap, "
            "scan, torch.func.vmap), where the values are not known; use "
            "AdamConfig(nonfinite='skip'), which selects with where, or 'propagate'"
        )
    if policy == "skip" and lazy:
        if config.max_consecutive_skips is not None:
            raise TypeError(
                f"{where}: max_consecutive_skips cannot be enforced on lazy arrays "
                "(under jax.jit or torch.func.vmap, or dask); leave it None there"
            )
        return "where"
    return "array"
