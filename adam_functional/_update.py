"""The pure update: `adam_init` and `adam_update`.

`adam_update` checks its ``state`` against the parameters, takes the checked step of
``adam_functional._step``, and runs it into fresh arrays; it writes none of its inputs.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from adam_functional import _tree
from adam_functional._namespaces import is_foreign, namespace
from adam_functional._records import AdamConfig, AdamState, ConfigTree, register_with_jax, seal
from adam_functional._step import (
    Fresh,
    LeafState,
    Step,
    configs_for,
    moments_dtype,
    one_library,
    plain,
    prepare_one,
    prepare_step,
    run,
    run_array_api,
    run_fresh,
    small_step,
)
from adam_functional._torch_views import Views, empty, views
from adam_functional._tree import ArrayTree, LeafPaths, TreeDef
from adam_functional.kernels import Inputs, Outputs

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
        zero = xp.zeros((), dtype=xp.asarray(0).dtype)
        counts = (zero, zero, zero)
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
        one = _update_one(params, grads, state, config)
        if one is not None:
            return one
    leaves, treedef = _tree.flatten(params, "params")
    configs = configs_for(config, treedef)
    numpy_only = all(type(p) is np.ndarray for p in leaves)
    if not numpy_only:
        one_library(leaves, LeafPaths(treedef, "params"))
    made = _made.get(id(state))
    states = made.leaf_states(state, leaves, treedef, configs) if made is not None else None
    if states is None:
        made = None
        states = _leaf_states(state, leaves, treedef, configs)
    if not numpy_only:
        tensors = views(leaves, grads, treedef, states, pure=True)
        if tensors is not None:
            return _update_tensors(tensors, leaves, state, configs, treedef)
    plan = None if made is None else made.plan
    known = {} if made is None else made.known(leaves)
    # First with the batches' checks left to the run, on their gathered gradients; a batch that
    # fails there makes the run stop, and every leaf is checked on its own (which raises, skips,
    # or finds the batch sound after all: a sum of squares may overflow where no square does).
    for defer in (True, False):
        step = prepare_step(
            leaves,
            treedef,
            grads,
            states,
            configs,
            in_place=False,
            batched=True,
            defer=defer,
            plan=plan,
        )
        if step.xp is not None:
            return _update_array_api(step, states, state, treedef)
        if step.coefficients is None:  # Skipped: the parameters as they were, the moments shared.
            copies = [np.array(p, copy=True) for p in step.params]
            skipped = attrs.evolve(state, skipped=state.skipped + 1, consecutive_skips=step.streak)
            return _tree.unflatten(treedef, copies), skipped
        fresh = run_fresh(step, states, known)
        if fresh is not None:
            break
    assert fresh is not None, "a step checked leaf by leaf runs"
    unflatten = _tree.unflatten
    new_state = AdamState._of_checked(
        unflatten(treedef, fresh.m),
        unflatten(treedef, fresh.v),
        state.t + 1,
        unflatten(treedef, fresh.v_max) if state.v_max is not None else None,
        state.skipped,
        0,
    )
    if numpy_only:
        _made[id(new_state)] = _Made(new_state, treedef, configs, step, fresh, made)
    return unflatten(treedef, fresh.p), new_state


def _update_one(
    p: np.ndarray, g: Any, state: AdamState, config: AdamConfig
) -> tuple[np.ndarray, AdamState] | None:
    """`adam_update` of one NumPy array in the common cases (`small_step`, `prepare_one`); None
    otherwise."""
    m, v = state.m, state.v
    if state.v_max is None and not state.consecutive_skips and type(v) is np.ndarray:
        small = small_step(p, g, m, v, state.t, config)
        if small is not None:
            new_p, new_m, new_v = small
            new_state = AdamState._of_checked(
                seal(new_m), seal(new_v), state.t + 1, None, state.skipped, 0
            )
            return new_p, new_state
    if type(v) is not np.ndarray or v.shape != m.shape or v.dtype != m.dtype:
        return None
    leaf = LeafState(m, v, state.v_max, state.t, state.consecutive_skips, None)
    step = prepare_one(p, g, leaf, config, in_place=False)
    if step is None:
        return None
    assert step.coefficients is not None
    out = Outputs(
        np.empty(p.shape, p.dtype), np.empty(m.shape, m.dtype), np.empty(m.shape, m.dtype), None
    )
    step.kernels[0](Inputs(p, g, m, v, None), step.coefficients[0], out)
    new_state = AdamState._of_checked(seal(out.m), seal(out.v), state.t + 1, None, state.skipped, 0)
    return out.p, new_state


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
        step: Step,
        fresh: Fresh,
        before: _Made | None,
    ) -> None:
        key = id(state)
        self.ref = weakref.ref(state, lambda _: _made.pop(key, None))
        self.leaves = (*fresh.m, *fresh.v, *fresh.v_max)
        self.present = [x for x in self.leaves if x is not None]
        self.flats = fresh.flats
        # Weakly: the parameters belong to the caller, who may drop them before the state.
        self.params = {
            group: (weakref.ref(flat.p), [weakref.ref(fresh.p[i]) for i in group])
            for group, flat in fresh.flats.items()
        }
        self.plan = step.plan
        if before is not None and before.plan is step.plan:
            # The same plan over the same parameters made arrays of the same shapes and layouts.
            self.treedef, self.configs = before.treedef, before.configs
            self.shapes, self.dtypes = before.shapes, before.dtypes
            self.layouts, self.p_layouts = before.layouts, before.p_layouts
            return
        self.treedef = treedef
        self.configs = configs
        self.shapes = [p.shape for p in step.params]
        self.dtypes = [p.dtype for p in step.params]
        self.layouts = list(map(_layout, self.present))
        self.p_layouts = {group: [_layout(fresh.p[i]) for i in group] for group in fresh.flats}

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
            known[group] = (p, flat.m, flat.v, flat.v_max)
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


def _update_tensors(
    tensors: Views,
    leaves: list[Any],
    state: AdamState,
    configs: list[AdamConfig],
    treedef: TreeDef,
) -> tuple[Any, AdamState]:
    """The end of `adam_update` for torch tensors in CPU memory: the NumPy kernels read their
    views and write into new tensors, through views of them."""
    import torch

    step = prepare_step(
        tensors.params, treedef, tensors.grads, tensors.states, configs, in_place=False
    )
    if step.coefficients is None:  # Skipped: the parameters as they were, the moments shared.
        kept = attrs.evolve(state, skipped=state.skipped + 1, consecutive_skips=step.streak)
        return _tree.unflatten(treedef, [p.detach().clone() for p in leaves]), kept
    new = [
        (
            torch.empty(p.shape, dtype=p.dtype),
            empty(p.shape, dtype),
            empty(p.shape, dtype),
            empty(p.shape, dtype) if c.amsgrad else None,
        )
        for p, dtype, c in zip(leaves, step.moments, configs)
    ]
    fields = [s for s in tensors.states if s is not None]  # the pure update's are all there
    outputs = [
        (p.numpy(), m.numpy(), v.numpy(), None if vm is None else vm.numpy()) for p, m, v, vm in new
    ]
    run(step, fields, outputs)
    return _results(new, state, treedef, state.t + 1, state.skipped, 0)


def _results(
    outputs: Sequence[Sequence[Any]],
    state: AdamState,
    treedef: TreeDef,
    t: Any,
    skipped: Any,
    streak: Any,
) -> tuple[Any, AdamState]:
    """The new parameters and state of a step on another library's arrays, from each leaf's
    ``(p, m, v, v_max)``."""
    new_p, new_m, new_v, new_vm = zip(*outputs) if outputs else ((), (), (), ())
    unflatten = _tree.unflatten
    return unflatten(treedef, list(new_p)), AdamState(
        unflatten(treedef, list(new_m)),
        unflatten(treedef, list(new_v)),
        t,
        unflatten(treedef, list(new_vm)) if state.v_max is not None else None,
        skipped,
        streak,
    )


def _update_array_api(
    step: Step, states: list[LeafState], state: AdamState, treedef: TreeDef
) -> tuple[Any, AdamState]:
    """The end of `adam_update` for another library's arrays: the kernel returns new arrays."""
    if step.coefficients is None:  # Skipped (known now): the parameters as they were.
        kept = attrs.evolve(state, skipped=state.skipped + 1, consecutive_skips=step.streak)
        copies = [step.xp.asarray(p, copy=True) for p in step.params]
        return _tree.unflatten(treedef, copies), kept
    outputs = run_array_api(step, states)
    # Counts held in arrays (JAX) stay arrays of their dtype, so that jit sees one signature.
    t, skipped, streak = state.t + 1, state.skipped, state.consecutive_skips * 0
    if step.taken is not None:  # Lazy arrays: the step is taken where `taken` holds.
        xp = step.xp
        count = state.t.dtype if hasattr(state.t, "dtype") else xp.int64
        taken = xp.astype(step.taken, count)
        t = state.t + taken
        skipped = state.skipped + (1 - taken)
        streak = (state.consecutive_skips + 1) * (1 - taken)
    return _results(outputs, state, treedef, t, skipped, streak)
