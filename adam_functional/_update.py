"""The pure update: `adam_init` and `adam_update`.

`adam_update` checks its ``state`` against the parameters, plans the step
(``adam_functional._plan``) and takes it (``adam_functional._step``) into fresh arrays; it writes
none of its inputs.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import Any

import attrs
import numpy as np

from adam_functional import _tree
from adam_functional._arrays import is_foreign, namespace, one_library, plain
from adam_functional._plan import (
    Checked,
    LeafState,
    build,
    configs_for,
    keep_one,
    kept_one,
    moments_dtype,
)
from adam_functional._records import AdamConfig, AdamState, ConfigTree, register_with_jax, seal
from adam_functional._step import Stepped, advance, take
from adam_functional._tree import ArrayTree, LeafPaths, TreeDef

__all__ = ["adam_init", "adam_update"]


def _require(value: Any, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name}: expected an {kind.__name__}, got {type(value).__name__}")


def adam_init(params: ArrayTree, config: AdamConfig | ConfigTree | None = None) -> AdamState:
    """Returns the state of Adam before its first step: zero moments shaped like ``params``.

    Args:
      params: a floating-point NumPy array, or a tree of them: nested dicts, lists, tuples and
        namedtuples with arrays at the leaves.
      config: an `AdamConfig`, or a tree of them that is a prefix of ``params`` (as in
        `adam_update`); the default is ``AdamConfig()``. Leaves whose config has
        ``amsgrad=True`` get ``v_max`` too, and each leaf's moments have the dtype its config's
        ``moment_dtype`` gives.

    Returns:
      An `AdamState` with ``t=0`` whose read-only ``m`` and ``v`` mirror ``params`` in
      structure and shapes. ``v_max`` is None when no leaf uses AMSGrad, else a tree like ``m``
      with None at the leaves that do not.

    Raises:
      TypeError: a leaf is not a floating-point array, or ``config`` is not an ``AdamConfig``
        or a tree of them.
      ValueError: the config tree does not fit ``params``.

    Examples:
      >>> import numpy as np
      >>> adam_init({"w": np.ones((2, 3)), "b": np.zeros(3, np.float32)})
      AdamState(t=0, skipped=0, consecutive_skips=0, m={'w': float64[2, 3], 'b': float32[3]}, \
v={'w': float64[2, 3], 'b': float32[3]}, v_max=None)
    """
    leaves, treedef = _tree.flatten(params, "params")
    configs = configs_for(AdamConfig() if config is None else config, treedef)
    paths = LeafPaths(treedef, "params")
    if any(is_foreign(leaf) for leaf in leaves):
        return _init_array_api(leaves, treedef, configs, paths)
    for index, leaf in enumerate(leaves):
        if plain(leaf).dtype.kind != "f":
            raise TypeError(
                f"{paths[index]}: expected a floating-point array (float16, float32, float64 or "
                f"longdouble), got dtype {leaf.dtype}"
            )
    dtypes = [c.moments_dtype(leaf.dtype) for leaf, c in zip(leaves, configs)]

    def zeros(where: list[bool]) -> Any:
        return _tree.unflatten(
            treedef,
            [
                seal(np.zeros(leaf.shape, dtype)) if wanted else None
                for leaf, dtype, wanted in zip(leaves, dtypes, where)
            ],
        )

    every = [True] * len(leaves)
    amsgrad = [c.amsgrad for c in configs]
    return AdamState(zeros(every), zeros(every), 0, zeros(amsgrad) if any(amsgrad) else None)


def _init_array_api(
    leaves: list[Any], treedef: TreeDef, configs: list[AdamConfig], paths: LeafPaths
) -> AdamState:
    """`adam_init` for the arrays of one library other than NumPy: zeros of that library, on the
    parameters' device (and, for JAX, with their sharding)."""
    lib = one_library(leaves, paths)
    xp = namespace(leaves[0], paths[0])
    dtypes = []
    for index, leaf in enumerate(leaves):
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise TypeError(
                f"{paths[index]}: expected a floating-point array, got dtype {leaf.dtype}"
            )
        dtypes.append(moments_dtype(xp, leaf.dtype, configs[index]))

    def zeros(where: list[bool]) -> Any:
        return _tree.unflatten(
            treedef,
            [
                xp.zeros_like(leaf, dtype=dtype) if wanted else None
                for leaf, dtype, wanted in zip(leaves, dtypes, where)
            ],
        )

    every = [True] * len(leaves)
    amsgrad = [c.amsgrad for c in configs]
    if lib == "jax":
        # Under jax.jit the count is data, a 0-d integer array, so that one trace serves every
        # step; it starts as one, so that the first call traces what the others do.
        register_with_jax()
        # The default integer dtype, not weakly typed: int32, or int64 with jax_enable_x64.
        # Each its own buffer, so that jit can take the state donated.
        counts = tuple(xp.zeros((), dtype=xp.asarray(0).dtype) for _ in range(3))
    else:
        counts = (0, 0, 0)
    v_max = zeros(amsgrad) if any(amsgrad) else None
    return AdamState(zeros(every), zeros(every), counts[0], v_max, counts[1], counts[2])


def adam_update(
    params: ArrayTree, grads: ArrayTree, state: AdamState, config: AdamConfig | ConfigTree
) -> tuple[ArrayTree, AdamState]:
    r"""Takes one Adam step: returns new parameters and a new state, and changes nothing.

    With ``t = state.t + 1``: Algorithm 1 of Kingma & Ba, with the bias-corrected moments, ``eps``
    outside the square root (as ``torch.optim.Adam`` and ``optax.adam``), and the options of
    `AdamConfig`. The formula, in the order it is computed, is on the
    [Algorithm](algorithm.md) page. The results agree with the notebook's class to rounding (a
    few ulps per step), bit for bit between this function, `Adam.step` and every NumPy backend.
    float16 parameters are computed in float32 and rounded back, with float32 moments by
    default (`AdamConfig.moment_dtype`).

    The function is pure: it writes none of its arguments, the new parameters are fresh arrays,
    and the new state's arrays are fresh and read-only. A skipped step (``nonfinite="skip"``)
    returns copies of the parameters and a state that shares the old state's read-only moments.

    Args:
      params: a floating-point array, or a tree of them (nested dicts, lists, tuples,
        namedtuples). Each leaf keeps its dtype (float16, float32, float64, longdouble).
      grads: the gradients, a tree with the structure of ``params`` whose leaves have exactly the
        shapes of the parameters (never broadcast) and real dtypes (cast to the parameters').
      state: from `adam_init` or a previous call, made for parameters of this structure.
      config: the hyperparameters: an `AdamConfig`, or a tree of them that is a prefix of
        ``params``, where a config at a node applies to every leaf below it (as JAX's
        ``in_axes``). ``{"w": AdamConfig(lr=1e-3, weight_decay=0.1,
        decoupled_weight_decay=True), "b": AdamConfig(lr=1e-3)}`` is AdamW with the decay masked
        off ``b``. Leaves may differ in every option; all share the state's step count.

    Returns:
      ``(new_params, new_state)``: ``new_params`` has the structure and container types of
      ``params``; ``new_state.t == state.t + 1`` unless the step was skipped.

    Raises:
      ValueError: ``grads``, the state or the config tree differ from ``params`` in structure,
        shape or dtype (the message names the path), or a schedule returned an invalid rate.
      TypeError: a parameter is not floating point, a gradient holds no real numbers, or
        ``state``/``config`` are not an ``AdamState``/``AdamConfig`` (tree).
      FloatingPointError: a gradient holds NaN or infinity (or its step would overflow the
        moments) and its config has ``nonfinite="raise"``.

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
    if type(params) is np.ndarray and type(config) is AdamConfig and type(state.m) is np.ndarray:
        leaf = LeafState(state.m, state.v, state.v_max, state.t, state.consecutive_skips, None)
        checked = kept_one(params, grads, leaf, config, False)
        if checked is not None:
            return _finish(checked, take(checked), state, None)
    leaves, treedef = _tree.flatten(params, "params")
    configs = configs_for(config, treedef)
    if not all(type(p) is np.ndarray for p in leaves):
        one_library(leaves, LeafPaths(treedef, "params"))
    made = _made.get(id(state))
    states = made.leaf_states(state, leaves, treedef, configs) if made is not None else None
    if states is None:
        made = None
        states = _leaf_states(state, leaves, treedef, configs)
    g_leaves = _tree.flatten_like(grads, treedef, "grads")
    checked = build(
        leaves,
        treedef,
        g_leaves,
        states,
        configs,
        in_place=False,
        batched=True,
        kept=None if made is None else made.plan,
    )
    if treedef is None:
        keep_one(checked, states[0], configs[0])
    stepped = take(checked, None if made is None else made.known(leaves))
    return _finish(checked, stepped, state, treedef, configs, made)


def _finish(
    checked: Checked,
    stepped: Stepped,
    state: AdamState,
    treedef: TreeDef,
    configs: list[AdamConfig] | None = None,
    made: _Made | None = None,
) -> tuple[Any, AdamState]:
    """The new parameters and state of a step: fresh arrays, or for a skipped step copies of
    the parameters and a state that shares the old one's moments."""
    plan, unflatten = checked.plan, _tree.unflatten
    t, skipped, streak = advance(state.t, state.skipped, state.consecutive_skips, stepped.taken)
    if stepped.new is None:
        copies = [_copy(p, plan.xp) for p in checked.tensors or checked.params]
        return unflatten(treedef, copies), attrs.evolve(
            state, skipped=skipped, consecutive_skips=streak
        )
    new_p, new_m, new_v, new_vm = (list(x) for x in zip(*stepped.new))
    trees = (
        unflatten(treedef, new_m),
        unflatten(treedef, new_v),
        t,
        unflatten(treedef, new_vm) if state.v_max is not None else None,
        skipped,
        streak,
    )
    if plan.xp is not None or checked.tensors is not None:
        return unflatten(treedef, new_p), AdamState(*trees)
    new_state = AdamState._of_checked(*trees)
    if configs is not None:
        _made[id(new_state)] = _Made(new_state, treedef, configs, checked, stepped, made)
    return unflatten(treedef, new_p), new_state


def _copy(p: Any, xp: Any) -> Any:
    """A copy of parameter ``p`` of its library, for a skipped step."""
    if xp is not None:
        return xp.asarray(p, copy=True)
    if isinstance(p, np.ndarray):
        return np.array(p, copy=True)
    return p.detach().clone()  # A CPU tensor.


class _Made:
    """What `adam_update` knows of a state it made, while the state lives.

    The next step over it can then skip the checks that the state fits its parameters (they
    passed for parameters of the same structure, shapes, dtypes and configs), and read each
    batch's moments, and parameters that are still the views it returned, from their flat
    buffers instead of gathering them. The state's trees are plain dicts and lists that anyone
    can change, so the leaves are compared, by identity, at every use.
    """

    __slots__ = (
        "configs",
        "dtypes",
        "flats",
        "layouts",
        "leaves",
        "p_layouts",
        "params",
        "plan",
        "present",
        "ref",
        "shapes",
        "treedef",
    )
    treedef: TreeDef
    configs: list[AdamConfig]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]
    #: (shape, strides) of each made moment, and of each batch's parameters.
    layouts: list[tuple[tuple[int, ...], tuple[int, ...]]]
    p_layouts: dict[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]
    present: list[np.ndarray]

    def __init__(
        self,
        state: AdamState,
        treedef: TreeDef,
        configs: list[AdamConfig],
        checked: Checked,
        stepped: Stepped,
        before: _Made | None,
    ) -> None:
        key = id(state)
        self.ref = weakref.ref(state, lambda _: _made.pop(key, None))
        assert stepped.new is not None
        new_p = [new[0] for new in stepped.new]
        self.leaves = tuple(new[k] for k in (1, 2, 3) for new in stepped.new)
        self.present = [x for x in self.leaves if x is not None]
        # The moments, which the state holds anyway; the parameters weakly: they belong to the
        # caller, who may drop them before the state.
        self.flats = {group: flat[1:] for group, flat in stepped.flats.items()}
        self.params = {
            group: (weakref.ref(flat[0]), [weakref.ref(new_p[i]) for i in group])
            for group, flat in stepped.flats.items()
        }
        self.plan = checked.plan
        if before is not None and before.plan is checked.plan:
            # The same plan over the same parameters made arrays of the same shapes and layouts.
            self.treedef, self.configs = before.treedef, before.configs
            self.shapes, self.dtypes = before.shapes, before.dtypes
            self.layouts, self.p_layouts = before.layouts, before.p_layouts
            return
        self.treedef = treedef
        self.configs = configs
        self.shapes = [p.shape for p in checked.params]
        self.dtypes = [p.dtype for p in checked.params]
        self.layouts = list(map(_layout, self.present))
        self.p_layouts = {group: [_layout(new_p[i]) for i in group] for group in stepped.flats}

    def leaf_states(
        self, state: AdamState, leaves: list[Any], treedef: TreeDef, configs: list[AdamConfig]
    ) -> list[LeafState] | None:
        """The state leaf by leaf when it is the one made, for parameters like those it was made
        for; else None (and `_leaf_states` checks it)."""
        if self.ref() is not state or treedef is not self.treedef:
            return None
        if len(configs) != len(self.configs) or not all(map(operator.is_, configs, self.configs)):
            return None
        for p, shape, dtype in zip(leaves, self.shapes, self.dtypes):
            if type(p) is not np.ndarray or p.shape != shape or p.dtype != dtype:
                return None
        count = len(leaves)
        m = _tree.flatten_like(state.m, treedef, "state.m")
        v = _tree.flatten_like(state.v, treedef, "state.v")
        v_max = (
            [None] * count
            if state.v_max is None
            else _tree.flatten_like(state.v_max, treedef, "state.v_max")
        )
        made = self.leaves
        if (
            len(made) != 3 * count
            or not all(map(operator.is_, made, itertools.chain(m, v, v_max)))
            or list(map(_layout, self.present)) != self.layouts
        ):
            return None
        t, streak = state.t, state.consecutive_skips
        make = LeafState._make
        return [make((a, b, c, t, streak, None)) for a, b, c in zip(m, v, v_max)]

    def known(self, params: list[np.ndarray]) -> dict[tuple[int, ...], Any]:
        """The flat buffers of each batch: its moments, and its parameters when they are still
        the views of the buffer that the previous step returned (else None: gathered)."""
        known = {}
        for group, flat in self.flats.items():
            buffer, views = self.params[group]
            layouts = self.p_layouts[group]
            p = buffer()
            if p is not None and not all(
                params[i] is view() and _layout(params[i]) == layout
                for i, view, layout in zip(group, views, layouts)
            ):
                p = None
            known[group] = (p, *flat)
        return known


# The shape and strides of an array: assigned in place, they make a view read other memory.
_layout = operator.attrgetter("shape", "strides")


# By id() of the state, each entry alive as long as its state.
_made: dict[int, _Made] = {}


def _leaf_states(
    state: AdamState, leaves: list[np.ndarray], treedef: TreeDef, configs: list[AdamConfig]
) -> list[LeafState]:
    """Checks that ``state`` was made for these parameters and configs; returns it leaf by leaf.

    Raises:
      ValueError: the state differs from the parameters in structure or shape, its moments
        have another dtype than the configs give, or it has ``v_max`` where a leaf's config has
        no AMSGrad (or the other way round).
    """
    m = _tree.flatten_like(state.m, treedef, "state.m")
    v = _tree.flatten_like(state.v, treedef, "state.v")
    if state.v_max is None:
        v_max: list[Any] = [None] * len(leaves)
    else:
        v_max = _tree.flatten_like(state.v_max, treedef, "state.v_max")
    wanted = {config.amsgrad for config in configs}
    if len(wanted) == 1 and wanted != {state.v_max is not None}:  # The whole tree, one way.
        amsgrad = wanted.pop()
        raise ValueError(
            f"state.v_max: expected {'arrays' if amsgrad else 'None'} with amsgrad={amsgrad}, got "
            f"{'None' if state.v_max is None else 'arrays'}; make the state with "
            "adam_init(params, config)"
        )
    for index, (p, config) in enumerate(zip(leaves, configs)):
        if config.amsgrad != (v_max[index] is not None):
            where = (
                LeafPaths(treedef, "state.v_max")[index]
                if state.v_max is not None
                else "state.v_max"
            )
            raise ValueError(
                f"{where}: expected {'an array' if config.amsgrad else 'None'} with "
                f"amsgrad={config.amsgrad}, got {'None' if v_max[index] is None else 'an array'}; "
                "make the state with adam_init(params, config)"
            )
        if type(p) is not np.ndarray and is_foreign(p):
            xp = namespace(p, "params")
            if not xp.isdtype(p.dtype, "real floating"):
                continue  # The step reports a parameter of the wrong dtype, in its own words.
            p_dtype, expected = p.dtype, moments_dtype(xp, p.dtype, config)
        else:
            p_dtype = plain(p).dtype
            if p_dtype.kind != "f":
                continue
            expected = config.moments_dtype(p_dtype)
        for name, x in (("m", m[index]), ("v", v[index]), ("v_max", v_max[index])):
            if (
                x is not None
                and (x.shape != p.shape or x.dtype != expected)
                and (tuple(x.shape) != tuple(p.shape) or x.dtype != expected)
            ):
                raise ValueError(
                    f"{LeafPaths(treedef, 'state.' + name)[index]}: expected dtype {expected} "
                    f"and shape {p.shape} like params, got dtype {x.dtype} and shape {x.shape}; "
                    f"{_mismatch_hint(x.dtype, p_dtype, expected)}"
                )
    return [
        LeafState(*arrays, state.t, state.consecutive_skips, None) for arrays in zip(m, v, v_max)
    ]


def _mismatch_hint(got: np.dtype, params: np.dtype, expected: np.dtype) -> str:
    if got == params and expected != params:
        # A state of 0.1, whose float16 parameters kept float16 moments.
        return (
            f"a state made with {params} moments needs AdamConfig(moment_dtype='params') "
            "(the default keeps float32 moments for float16 parameters)"
        )
    return "was this state made for other params?"
