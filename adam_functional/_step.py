"""The checked step of both APIs: every check, the skip decision and the scalars; then the run.

`prepare_step` looks at everything a step will read (parameters, gradients, moments, config)
and decides what the step does, writing nothing: it returns a `Step`, or raises. `run` then
hands each leaf to its kernel, with the outputs the caller chose: fresh arrays for `adam_update`,
the arrays themselves and the optimizer's buffers for `Adam.step`. A check added here holds for
both APIs, and since every check runs before `run`, a step that raises has changed nothing.

`prepare_one` is `prepare_step` for one NumPy array in the common case, in one pass; it defers
to `prepare_step` wherever a check would not plainly pass. `small_step` is `prepare_one` and
`run` at once for the notebook's case, a few float64 elements, where a step is all overhead.
`run_fresh` runs the pure update's step into fresh arrays, the small leaves of a tree in flat
batches (`batches`).
"""

from __future__ import annotations

import array
import math
import mmap
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from adam_functional import kernels
from adam_functional._namespaces import (
    is_foreign,
    is_lazy,
    is_traced,
    library,
    namespace,
    refuse_unsupported,
)
from adam_functional._records import AdamConfig, seal
from adam_functional._tree import (
    MAX_DEPTH,
    LeafPaths,
    TreeDef,
    broadcast_prefix,
    flatten_like,
    leaf_count,
)
from adam_functional.kernels import Coefficients, Inputs, Kernel, Outputs
from adam_functional.kernels import array_api as array_api_kernel
from adam_functional.kernels import numpy as reference

__all__ = [
    "BATCH_LEAF",
    "BATCH_SIZE",
    "Flat",
    "Fresh",
    "LeafState",
    "Plan",
    "Step",
    "batches",
    "configs_for",
    "moments_dtype",
    "one_library",
    "plain",
    "prepare_one",
    "prepare_step",
    "run",
    "run_array_api",
    "run_fresh",
    "small_step",
]

_FLOAT64 = np.dtype(np.float64)
_FLOAT_PARAMS = "a floating-point array (float16, float32, float64 or longdouble)"
# Elements per step of the walk that looks at a gradient value by value.
_CHUNK = 8192


class LeafState(NamedTuple):
    """What a step reads of one parameter's state.

    ``origin`` says where the moments came from, for the error when they do not fit the
    parameter (``"as at its first step"``); None when the caller has checked that they fit.
    """

    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray | None
    t: Any  # An int; a 0-d integer array under jax.jit.
    consecutive_skips: Any
    origin: str | None


class Step(NamedTuple):
    """A checked step, ready to run: its inputs as plain arrays, and what each leaf gets."""

    params: list[np.ndarray]
    grads: list[np.ndarray]
    #: One per leaf, or None when the step is skipped (``nonfinite="skip"``).
    coefficients: list[Coefficients] | None
    kernels: list[Kernel]
    #: The dtype of each leaf's moments.
    moments: list[Any]
    #: Skipped steps in a row after this one: 0 when it is taken.
    streak: int
    #: The namespace of another library's arrays (then the kernel returns new arrays), or None.
    xp: Any = None
    #: For lazy arrays (under jax.jit, or dask) with ``nonfinite="skip"``: a 0-d boolean array,
    #: whether the step is taken, for the caller to select with ``where``; else None.
    taken: Any = None
    #: With ``batched=True``: what was decided from dtypes and configs, the batches among it.
    plan: Plan | None = None
    #: The batches whose gradients `run_fresh` checks, gathered (see `prepare_step`).
    unchecked: tuple[tuple[int, ...], ...] = ()


class Plan(NamedTuple):
    """What a batched step decides from the leaves' dtypes and the configs alone, before it looks
    at a value: kept by the pure update for its next step over the same parameters (structure,
    shapes, dtypes) and configs, and taken while the gradients' dtypes and the kernels `select`
    gives are the same."""

    #: The gradients' dtypes it was made for.
    grads: list[np.dtype]
    moments: list[np.dtype]
    kernels: list[Kernel]
    #: The leaves in groups, one kernel call each (`batches`).
    groups: list[tuple[int, ...]]
    #: `kernels.selection` when it was made.
    selection: tuple[object, int]


def plain(array: np.ndarray) -> np.ndarray:
    """``array`` as a plain ``ndarray`` over the same memory.

    A subclass can give ``reshape``, indexing and ufuncs another meaning (``np.matrix`` keeps
    two dimensions through ``reshape(-1)``); the kernels see its memory as a plain array.
    """
    return array if type(array) is np.ndarray else array.view(np.ndarray)


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


def prepare_step(
    leaves: list[np.ndarray],
    treedef: TreeDef,
    grads: Any,
    states: Sequence[LeafState | None],
    configs: Sequence[AdamConfig],
    *,
    in_place: bool,
    batched: bool = False,
    defer: bool = True,
    plan: Plan | None = None,
) -> Step:
    """Checks one step over the parameter ``leaves`` (of the tree ``treedef``) and plans it.

    ``states`` and ``configs`` have one entry per leaf: its moments and counts (or None for a
    parameter that starts from zero moments), and its hyperparameters. A state whose ``origin``
    is None has been checked against its parameter by the caller. ``in_place`` says the kernel
    will write the parameters themselves, which must then be writeable and overlap nothing.
    ``batched`` (the pure update) groups the small leaves into batches, and leaves the check of
    a batch's gradients to `run_fresh`, which makes it on the batch gathered into one flat array:
    one pass, in cache, where a leaf by leaf check would take one call per leaf. ``defer=False``
    checks every leaf here, as `run_fresh` asks when a batch fails its check. ``plan``, the
    `Step.plan` of the previous step over these parameters and configs, spares it deciding again
    what dtypes and configs decide.

    Raises:
      TypeError: a parameter is not a floating-point (writeable) array, or a gradient holds no
        real numbers.
      ValueError: the gradients differ from the parameters in structure or shape, a state does
        not fit its parameter, parameters overlap (in place), or a schedule's rate is invalid.
      FloatingPointError: a gradient is not finite (or would overflow the moments) and the
        leaf's config says to raise.
    """
    paths = LeafPaths(treedef, "params")
    if not all(type(p) is np.ndarray for p in leaves) and any(is_foreign(p) for p in leaves):
        return _prepare_array_api(leaves, treedef, grads, states, configs, in_place, paths)
    params = [p if type(p) is np.ndarray else plain(p) for p in leaves]
    _check_params(params, paths, in_place)
    if in_place:
        _refuse_duplicates(leaves, paths)
    g_leaves = flatten_like(grads, treedef, "grads")
    g_paths = LeafPaths(treedef, "grads")
    grads_arrays = []
    for index, (g, p) in enumerate(zip(g_leaves, params)):
        if type(g) is not np.ndarray or g.shape != p.shape or g.dtype.kind not in "fiu":
            g = _as_grad(g, p, g_paths, index)
        grads_arrays.append(g)
    if plan is not None and (
        not kernels.same_selection(plan.selection)
        or any(g.dtype != dtype for g, dtype in zip(grads_arrays, plan.grads))
    ):
        plan = None
    moments = (
        plan.moments
        if plan is not None
        else [config.moments_dtype(p.dtype) for p, config in zip(params, configs)]
    )
    streak = 0
    for index, state in enumerate(states):
        if state is not None:
            if state.origin is not None:
                _check_fit(state, params[index], moments[index], configs[index], paths, index)
            if state.consecutive_skips > streak:
                streak = state.consecutive_skips
    streak += 1
    if plan is None:
        total = sum(p.size for p in params)
        choose = [
            kernels.select(p.dtype, g.dtype, dtype, total)
            for p, g, dtype in zip(params, grads_arrays, moments)
        ]
    else:
        choose = plan.kernels
    if in_place:
        _copy_overlapping(grads_arrays, params)
    unchecked: tuple[tuple[int, ...], ...] = ()
    if batched:
        if plan is None:
            plan = Plan(
                [g.dtype for g in grads_arrays],
                moments,
                choose,
                batches(params, grads_arrays, moments, configs, choose),
                kernels.selection(),
            )
        if defer:
            unchecked = tuple(
                group
                for group in plan.groups
                if len(group) > 1 and _batch_checkable(configs[group[0]])
            )
    deferred = {index for group in unchecked for index in group}
    check = [
        index
        for index, config in enumerate(configs)
        if config.nonfinite != "propagate" and index not in deferred
    ]

    def bad(indices: Iterable[int]) -> bool:
        return _gradients_checked(
            indices, grads_arrays, params, states, configs, moments, streak, g_paths
        )

    # The batches' leaves are checked here too wherever they decide: a bad gradient whose config
    # raises wins over one whose skips, and the first such leaf in the tree is named; a schedule's
    # error does not hide either.
    try:
        skip = bad(check)
    except FloatingPointError:
        if not deferred:
            raise
        skip = True
    if skip:
        bad([*check, *deferred])  # raises, or the step is skipped
        return Step(params, grads_arrays, None, choose, moments, streak)
    try:
        coefficients = _coefficients(states, configs)
    except Exception:
        if bad(deferred):
            return Step(params, grads_arrays, None, choose, moments, streak)
        raise
    return Step(params, grads_arrays, coefficients, choose, moments, 0, None, None, plan, unchecked)


def _batch_checkable(config: AdamConfig) -> bool:
    """Whether one quick test of a batch's gathered gradients can stand for its leaves' checks:
    they share this config, and a dtype that is the one the step computes in."""
    return config.nonfinite != "propagate" and not (
        config.weight_decay > 0 and not config.decoupled_weight_decay
    )


def _gradients_checked(
    indices: Iterable[int],
    grads: list[np.ndarray],
    params: list[np.ndarray],
    states: Sequence[LeafState | None],
    configs: Sequence[AdamConfig],
    moments: list[np.dtype],
    streak: int,
    paths: LeafPaths,
) -> bool:
    """Checks the gradients of the leaves ``indices``, in order: raises for the first bad one
    whose config says to raise, and returns whether a bad one may be skipped."""
    skip = False
    for index in sorted(indices):
        config = configs[index]
        problem = _gradient_problem(
            grads[index], params[index], moments[index], states[index], config
        )
        if problem is None:
            continue
        if not _may_skip(config, streak):
            raise _nonfinite_error(problem, paths[index], config, streak)
        skip = True
    return skip


def prepare_one(
    p: Any, g: Any, state: LeafState | None, config: AdamConfig, *, in_place: bool
) -> Step | None:
    """`prepare_step` for one NumPy array in the common case, in one pass: a step taken, with
    gradients and moments of the parameter's dtype and shape, no AMSGrad, and nothing shared.

    Returns None unless every check of `prepare_step` plainly passes (then `prepare_step` says
    what is wrong, or handles the rarer case): it raises nothing of its own.
    """
    if (
        type(p) is not np.ndarray
        or type(g) is not np.ndarray
        or config.amsgrad
        or g.shape != p.shape
        or g.dtype != p.dtype
        or p.dtype.kind != "f"
    ):
        return None
    moments = config.moments_dtype(p.dtype)
    if state is not None and (
        state.m.shape != p.shape
        or state.m.dtype != moments
        or state.v_max is not None
        or state.consecutive_skips
    ):
        return None
    if in_place:
        flags = p.flags
        owner, g_owner = _owner(p), _owner(g)
        # An owner that is unknown may be anyone's: the general path compares memory bounds.
        if not (flags.writeable and flags.c_contiguous) or owner is None or g_owner is None:
            return None
        if owner is g_owner:
            return None
    if config.nonfinite != "propagate" and _gradient_problem(g, p, moments, state, config):
        return None
    kernel = kernels.select(p.dtype, g.dtype, moments, p.size)
    c = kernels.coefficients(config, 1 if state is None else state.t + 1)
    return Step([p], [g], [c], [kernel], [moments], 0)


def small_step(
    p: np.ndarray,
    g: Any,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    config: AdamConfig,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`prepare_one` and `run` at once, for a float64 (or, compiled, float32) NumPy array of at
    most `kernels.numpy.SCALAR_SIZE` elements, a constant learning rate and no option but L2
    weight decay (the notebook's examples), from moments ``m`` and ``v`` after ``t`` steps, by
    `kernels.small_step`: the same bits as `run`. It writes into ``out``, the C-contiguous new
    ``(p, m, v)``, or into new arrays where ``out`` is None, and returns them.

    Returns None unless every check plainly passes, and then it has written nothing:
    `prepare_step` says what is wrong, or takes the step. The gradient's check is the step's
    own arithmetic: every new ``v`` is finite only when no square of the gradient (after L2) is
    NaN or overflows, since ``1 - beta2 > 0``.
    """
    shape, dtype = p.shape, p.dtype
    if (
        type(g) is not np.ndarray
        or p.size > reference.SCALAR_SIZE
        or g.dtype != dtype
        or m.dtype != dtype
        or v.dtype != dtype
        or g.shape != shape
        or m.shape != shape
        or v.shape != shape
        or type(t) is not int
    ):
        return None
    plain = _plain_scalars(config)
    if plain is None or dtype not in plain[1]:
        return None
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, l2, eps = plain[0]
    bias_correction1, bias_correction2 = kernels.bias_corrections(beta1, beta2, t + 1)
    step_m, eps = reference.fold_plain(lr, bias_correction1, bias_correction2, eps)
    if out is None:
        out = (np.empty(shape, dtype), np.empty(shape, dtype), np.empty(shape, dtype))
    scalars = (beta1, one_minus_beta1, beta2, one_minus_beta2, l2, step_m, eps)
    return out if kernels.small_step((p, g, m, v, *out), scalars) else None


# The scalars of `small_step` that a config fixes, by id(config), with a weak reference that
# tells whether the id still names that config; cleared when it grows past a few configs.
_PLAIN: dict[int, tuple[Any, Any]] = {}
_SMALL_DTYPES = (_FLOAT64, np.dtype(np.float32))


def _plain_scalars(config: AdamConfig) -> tuple[tuple[float, ...], tuple[np.dtype, ...]] | None:
    """For a config with a constant learning rate and no option but L2 weight decay
    (`kernels.numpy.is_plain`): ``(lr, beta1, 1 - beta1, beta2, 1 - beta2, l2, eps)`` as
    `kernels.coefficients` makes them, and the dtypes of `small_step` whose moments it keeps in
    that dtype. Else None."""
    entry = _PLAIN.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]  # type: ignore[no-any-return]
    plain = None
    if type(config.lr) is float:
        c = kernels.coefficients(config, 1)  # what does not depend on the step
        if reference.is_plain(c):
            dtypes = tuple(d for d in _SMALL_DTYPES if config.moments_dtype(d) == d)
            scalars = (c.lr, c.beta1, c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.l2, c.eps)
            plain = scalars, dtypes
    if len(_PLAIN) >= 64:
        _PLAIN.clear()
    _PLAIN[id(config)] = (weakref.ref(config), plain)
    return plain


def _coefficients(
    states: Sequence[LeafState | None], configs: Sequence[AdamConfig], xp: Any = None
) -> list[Coefficients]:
    """The scalars of each config and step count (in the wrapper, arrays may have taken
    different numbers of steps); a schedule may raise here, still before anything is written."""
    first_config, first_state = configs[0] if configs else None, states[0] if states else None
    if (
        len(configs) > 1
        and all(c is first_config for c in configs)
        and all(
            s is first_state or (s is not None and first_state is not None and s.t is first_state.t)
            for s in states
        )
    ):  # One config and one count (the pure update's common case): one set of scalars.
        return _coefficients(states[:1], configs[:1], xp) * len(configs)
    cache: dict[tuple[int, Any], Coefficients] = {}
    coefficients = []
    for state, config in zip(states, configs):
        count = 0 if state is None else state.t
        if not isinstance(count, int) and not is_lazy(count):
            count = int(count)  # A concrete array (JAX outside jit): the exact path.
        # A count held in a lazy array (under jax.jit, say) is keyed by the array, alive meanwhile.
        key = (id(config), count if isinstance(count, int) else ("array", id(count)))
        c = cache.get(key)
        if c is None:
            if isinstance(count, int):
                c = kernels.coefficients(config, count + 1)
            else:  # The scalars as 0-d arrays.
                c = _array_coefficients(xp, config, count + 1, state)
            cache[key] = c
        coefficients.append(c)
    return coefficients


def _check_fit(
    state: LeafState,
    p: np.ndarray,
    moments: np.dtype,
    config: AdamConfig,
    paths: LeafPaths,
    index: int,
) -> None:
    # Paths are formatted only for an error: formatting them all costs more than the checks.
    if state.m.shape != p.shape:
        raise ValueError(
            f"{paths[index]}: expected dtype {p.dtype} and shape {state.m.shape} "
            f"{state.origin}, got dtype {p.dtype} and shape {p.shape}"
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


def run_array_api(step: Step, states: Sequence[LeafState]) -> list[Outputs]:
    """Runs a taken step on another library's arrays: the new arrays, leaf by leaf. For lazy
    arrays whose step may be skipped, each new array is the old one where it is."""
    assert step.coefficients is not None
    assert step.xp is not None
    xp, results = step.xp, []
    for p, g, state, c in zip(step.params, step.grads, states, step.coefficients):
        new = array_api_kernel.adam_leaf(xp, Inputs(p, g, state.m, state.v, state.v_max), c)
        if step.taken is not None:
            old = (p, state.m, state.v, state.v_max)
            new = Outputs._make(
                None if a is None else xp.where(step.taken, a, b) for a, b in zip(new, old)
            )
        results.append(new)
    return results


def run(
    step: Step,
    states: Sequence[LeafState],
    outputs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
) -> None:
    """Runs a taken step: each leaf's kernel reads its parameter, gradient and ``states`` entry
    and writes ``outputs``' entry ``(p, m, v, v_max)``."""
    assert step.coefficients is not None, "a skipped step has nothing to run"
    for p, g, state, c, kernel, out in zip(
        step.params, step.grads, states, step.coefficients, step.kernels, outputs
    ):
        kernel(Inputs(p, g, state.m, state.v, state.v_max), c, Outputs(*out))


#: Leaves of at most this many elements are stepped together by the pure update: gathered into
#: one flat batch of at most `BATCH_SIZE` elements per dtype and config, on which the kernel runs
#: once. A kernel call costs the same few microseconds whatever its length, so a tree of many
#: small arrays pays it per batch, not per leaf.
BATCH_LEAF = 1 << 13
#: The largest batch: half a block of the NumPy kernel, whose gathered inputs stay in cache.
BATCH_SIZE = 1 << 14


class Flat(NamedTuple):
    """One batch's new values, as flat arrays: each leaf's are a view of them."""

    #: The new parameters (writeable).
    p: np.ndarray
    #: The new moments (sealed); ``v_max`` None without AMSGrad.
    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray | None


class Fresh(NamedTuple):
    """What `run_fresh` returns: new arrays per leaf, and where each batch's lie."""

    p: list[np.ndarray]
    m: list[np.ndarray]
    v: list[np.ndarray]
    v_max: list[np.ndarray | None]
    #: For each batch of several leaves, by its leaf indices.
    flats: dict[tuple[int, ...], Flat]


def batches(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    moments: Sequence[np.dtype],
    configs: Sequence[AdamConfig],
    chosen: Sequence[Kernel],
) -> list[tuple[int, ...]]:
    """The leaves of a NumPy step in groups: one kernel call each.

    Leaves of at most `BATCH_LEAF` elements whose parameters, gradients and moments share one
    dtype, the one the step computes in, and whose config (hence scalars: the pure update's
    leaves share one count) and kernel are the same go together, up to `BATCH_SIZE` elements;
    every other leaf is a group of its own.
    """
    groups: list[list[int]] = []
    open_groups: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {}
    for index, (p, g, dtype_m, config, kernel) in enumerate(
        zip(params, grads, moments, configs, chosen)
    ):
        size = p.size
        dtype = p.dtype
        if (
            size > BATCH_LEAF
            or g.dtype != dtype
            or dtype_m != dtype
            or kernels.work_dtype(dtype, dtype_m) != dtype
        ):
            groups.append([index])
            continue
        key = (dtype, id(config), kernel)
        found = open_groups.get(key)
        if found is None or found[1][0] + size > BATCH_SIZE:
            found = open_groups[key] = ([], [0])
            groups.append(found[0])
        found[0].append(index)
        found[1][0] += size
    return [tuple(group) for group in groups]


def run_fresh(
    step: Step,
    states: Sequence[LeafState],
    known: dict[
        tuple[int, ...], tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None]
    ],
) -> Fresh | None:
    """Runs a taken step of `prepare_step` with ``batched=True`` into fresh arrays, batch by
    batch; returns None, having written nothing but scratch and fresh arrays, when a batch fails
    the check of its gathered gradients that `prepare_step` left to it (its leaves then need the
    checks leaf by leaf: `prepare_step` with ``defer=False``).

    A batch's gradients are gathered into a scratch buffer, and so are its parameters and moments
    unless ``known`` gives their flat arrays ``(p or None, m, v, v_max)`` (those the previous step
    made); its results are flat buffers of which each leaf gets a view. The moments are sealed.
    """
    assert step.coefficients is not None
    assert step.plan is not None, "a step prepared batched"
    count = len(step.params)
    new: list[list[Any]] = [[None] * count for _ in range(4)]
    flats = {}
    for group in step.plan.groups:
        first = group[0]
        c = step.coefficients[first]
        kernel = step.kernels[first]
        if len(group) == 1:
            p, state, dtype = step.params[first], states[first], step.moments[first]
            out = Outputs(
                np.empty(p.shape, p.dtype),
                np.empty(p.shape, dtype),
                np.empty(p.shape, dtype),
                np.empty(p.shape, dtype) if c.amsgrad else None,
            )
            kernel(Inputs(p, step.grads[first], state.m, state.v, state.v_max), c, out)
            for k, array in enumerate(out):
                new[k][first] = array if k == 0 or array is None else seal(array)
            continue
        dtype = step.params[first].dtype
        total = sum(step.params[i].size for i in group)
        flat_g = _gathered([step.grads[i] for i in group], "g", total, dtype)
        if group in step.unchecked and not kernels.squares_fit(flat_g, dtype):
            return None
        flat = known.get(group)
        flat_p = None if flat is None else flat[0]
        if flat_p is None:
            flat_p = _gathered([step.params[i] for i in group], "p", total, dtype)
        moments = None if flat is None else flat[1:]
        if moments is None:
            v_max = [states[i].v_max for i in group]
            moments = (
                _gathered([states[i].m for i in group], "m", total, dtype),
                _gathered([states[i].v for i in group], "v", total, dtype),
                _gathered(v_max, "v_max", total, dtype) if c.amsgrad else None,  # type: ignore[arg-type]
            )
        out = Outputs(
            np.empty(total, dtype),
            np.empty(total, dtype),
            np.empty(total, dtype),
            np.empty(total, dtype) if c.amsgrad else None,
        )
        kernel(Inputs(flat_p, flat_g, *moments), c, out)
        sealed = Outputs(
            out.p, seal(out.m), seal(out.v), None if out.v_max is None else seal(out.v_max)
        )
        flats[group] = Flat(*sealed)
        offset = 0
        for index in group:
            shape = step.params[index].shape
            end = offset + step.params[index].size
            for k, array in enumerate(sealed):
                if array is not None:
                    new[k][index] = array[offset:end].reshape(shape)
            offset = end
    return Fresh(new[0], new[1], new[2], new[3], flats)


def _gathered(arrays: list[np.ndarray], name: str, total: int, dtype: np.dtype) -> np.ndarray:
    """``arrays`` one after the other in a scratch array of this thread."""
    target = kernels.scratch(f"gather {name}", total, dtype)
    np.concatenate([a.reshape(-1) for a in arrays], out=target)
    return target


# -------------------------------------------------------------------------------------------------
# Parameters and gradients.


def _check_params(params: list[np.ndarray], paths: LeafPaths, in_place: bool) -> None:
    for index, p in enumerate(params):
        if p.dtype.kind != "f":
            raise TypeError(f"{paths[index]}: expected {_FLOAT_PARAMS}, got dtype {p.dtype}")
        if in_place:
            if not p.flags.writeable:
                raise TypeError(
                    f"{paths[index]}: expected a writeable array to update in place, "
                    "got a read-only array"
                )
            if _overlaps_itself(p):
                raise ValueError(
                    f"{paths[index]}: expected an array whose elements share no memory, got "
                    f"one with strides {p.strides} over shape {p.shape} (a broadcast or "
                    "as_strided view); step a copy, or its base array"
                )
    if in_place:
        _refuse_overlaps(params, paths)


def _as_grad(g: Any, p: np.ndarray, paths: LeafPaths, index: int) -> np.ndarray:
    """Returns gradient leaf ``g`` as a plain array after checking it against parameter ``p``."""
    if type(g) is np.ndarray:
        pass
    elif isinstance(g, np.ndarray):
        g = plain(g)
    else:
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
# Memory: in place, no two parameters may share memory, and a gradient that shares memory with a
# parameter is read from a copy (the kernel writes parameters leaf by leaf, block by block).


def _bounds(a: np.ndarray) -> tuple[int, int]:
    """The first byte of ``a``'s memory and one past its last (``numpy``'s byte_bounds)."""
    low = high = a.__array_interface__["data"][0]
    for extent, stride in zip(a.shape, a.strides):
        if stride < 0:
            low += (extent - 1) * stride
        else:
            high += (extent - 1) * stride
    return low, high + a.itemsize


def _overlaps_itself(a: np.ndarray) -> bool:
    """Whether two elements of ``a`` may share memory (a stride of 0, or strides that interleave).

    Dimensions sorted by stride, each stride must step over all the elements of the smaller ones;
    that holds for every array NumPy makes without ``as_strided`` or broadcasting.
    """
    flags = a.flags
    if a.size <= 1 or flags.c_contiguous or flags.f_contiguous:
        return False
    extent = a.itemsize
    for stride, size in sorted((abs(d), s) for s, d in zip(a.shape, a.strides) if s > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def _owner(a: np.ndarray) -> object | None:
    """The object that owns the memory ``a`` views, as its references tell: an array that owns
    its data, or a bytes-like object. None when they do not tell (memory reached through a
    pointer, ``__array_interface__`` or ctypes), which may then be anyone's.

    Memory that two owners own is two allocations, which never overlap.
    """
    node: Any = a
    for _ in range(MAX_DEPTH):
        if isinstance(node, np.ndarray):
            base = node.base
            if base is None:
                return node if node.flags.owndata else None
            node = base
        elif isinstance(node, memoryview):
            node = node.obj
        elif isinstance(node, bytes | bytearray | mmap.mmap | array.array):
            return node
        else:
            return None
    return None


def _candidates(arrays: Sequence[np.ndarray], first_group: int | None) -> list[int]:
    """The arrays that may share memory with another: those whose owner has another array in
    ``arrays`` (for ``first_group``, on the other side of it), and every array when an owner is
    unknown. In the common case, fresh arrays each with its own memory, none."""
    groups: dict[int, list[int]] = {}
    for index, a in enumerate(arrays):
        owner = _owner(a)
        if owner is None:
            return list(range(len(arrays)))
        groups.setdefault(id(owner), []).append(index)
    candidates = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if first_group is not None and not members[0] < first_group <= members[-1]:
            continue
        candidates.extend(members)
    return candidates


def _overlapping_pairs(
    arrays: Sequence[np.ndarray], first_group: int | None = None
) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, of arrays that share memory.

    Only arrays that may (`_candidates`) are compared. Sorted by their first byte, only those
    whose byte ranges intersect are: n log n for arrays that lie apart, as parameters do,
    whatever objects own their memory. With ``first_group``, only pairs with
    ``i < first_group <= j`` are looked for.
    """
    candidates = _candidates(arrays, first_group)
    if not candidates:
        return []
    spans = sorted(
        (*_bounds(arrays[index]), index) for index in candidates if arrays[index].size > 0
    )
    pairs = []
    open_spans: list[tuple[int, int]] = []  # (end, index) of spans that may reach further
    for low, high, index in spans:
        open_spans = [(end, other) for end, other in open_spans if end > low]
        for _, other in open_spans:
            i, j = min(index, other), max(index, other)
            if first_group is not None and not i < first_group <= j:
                continue
            if _shares(arrays[i], arrays[j]):
                pairs.append((i, j))
        open_spans.append((high, index))
    return pairs


def _shares(a: np.ndarray, b: np.ndarray) -> bool:
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:  # Too intricate to tell: treat as overlapping.
        return True


def _refuse_duplicates(leaves: list[Any], paths: LeafPaths) -> None:
    """Refuses one array given twice, empty ones too (whose memory overlaps nothing)."""
    if len({id(leaf) for leaf in leaves}) == len(leaves):
        return
    first_seen: dict[int, int] = {}
    for index, leaf in enumerate(leaves):
        first = first_seen.setdefault(id(leaf), index)
        if first != index:
            raise ValueError(
                f"{paths[index]}: expected each array once, got the same array as {paths[first]}"
            )


def _refuse_overlaps(params: list[np.ndarray], paths: LeafPaths) -> None:
    if len(params) < 2:
        return
    pairs = _overlapping_pairs(params)
    if pairs:
        first, second = min(pairs, key=lambda pair: (pair[1], pair[0]))
        if params[first].__array_interface__ == params[second].__array_interface__:
            raise ValueError(
                f"{paths[second]}: expected each array once, got the same array as {paths[first]}"
            )
        raise ValueError(
            f"{paths[second]}: expected arrays that share no memory, got one that overlaps "
            f"{paths[first]}"
        )


def _copy_overlapping(grads: list[np.ndarray], params: list[np.ndarray]) -> None:
    # One gradient array may serve several leaves: each distinct one is looked at, and copied,
    # once.
    distinct: dict[int, np.ndarray] = {id(g): g for g in grads}
    n = len(params)
    candidates = [*params, *distinct.values()]
    copies: dict[int, np.ndarray] = {}
    for _, second in _overlapping_pairs(candidates, first_group=n):
        g = candidates[second]
        copies.setdefault(id(g), np.array(g, copy=True))
    if copies:
        grads[:] = [copies.get(id(g), g) for g in grads]


# -------------------------------------------------------------------------------------------------
# Non-finite gradients.


def _may_skip(config: AdamConfig, streak: int) -> bool:
    """Whether a step with bad gradients may be skipped as the ``streak``-th in a row."""
    if config.nonfinite != "skip":
        return False
    return config.max_consecutive_skips is None or streak <= config.max_consecutive_skips


def _nonfinite_error(
    problem: str, path: str, config: AdamConfig, streak: int
) -> FloatingPointError:
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


def _gradient_problem(
    g: np.ndarray, p: np.ndarray, moments: np.dtype, state: LeafState | None, config: AdamConfig
) -> str | None:
    """Says what is wrong with gradient ``g`` of parameter ``p``, or returns None.

    A gradient is wrong when it holds NaN or infinity, or a value whose square overflows the
    dtype the step computes in (`kernels.work_dtype`: a float64 gradient of float32 parameters
    is judged in float32): ``v`` would become infinite and the coordinate would never move again.
    The same holds for what the step really uses, the gradient after L2 weight decay
    ``g + weight_decay * p``, and for the moments in their storage dtype when it is narrower than
    the work dtype (float16 moments).

    A sum of squares clears NaN, infinity and overflowing squares at once in the common case: it
    is at most the dtype's largest value exactly when no such value is there, unless the sum
    itself is too large. It is taken in chunks (``np.vdot``: no allocation, one read, no
    floating-point flags). Only a gradient that fails, and the rarer configurations, are looked
    at value by value.
    """
    if g.size == 0:
        return None
    work = kernels.work_dtype(p.dtype, moments)
    l2 = config.weight_decay if config.weight_decay > 0 and not config.decoupled_weight_decay else 0
    if l2 == 0 and moments == work and kernels.squares_fit(g, work):
        return None
    return _find_bad_values(g, p, moments, state, config, work, l2)


def _find_bad_values(
    g: np.ndarray,
    p: np.ndarray,
    moments: np.dtype,
    state: LeafState | None,
    config: AdamConfig,
    work: np.dtype,
    l2: float,
) -> str | None:
    """Walks ``g`` in chunks, computing what the kernel will, and describes the first fault."""
    limit = np.sqrt(np.finfo(work).max)
    storage_max = float(np.finfo(moments).max) if moments != work else None
    flat_g, flat_p = g.reshape(-1), p.reshape(-1)
    flat_m = flat_v = None
    if state is not None and storage_max is not None:
        flat_m, flat_v = state.m.reshape(-1), state.v.reshape(-1)
    counts = {"nonfinite": 0, "huge": 0, "storage": 0}
    first: dict[str, int] = {}
    with np.errstate(all="ignore"):
        for start in range(0, flat_g.shape[0], _CHUNK):
            stop = start + _CHUNK
            block = flat_g[start:stop].astype(work)
            bad = ~np.isfinite(flat_g[start:stop])
            big = ~bad
            if l2:
                # Only a finite parameter: an infinite one is not the gradient's fault, and the
                # step carries it as the plain formula does.
                decayed = flat_p[start:stop].astype(work)
                big &= np.isfinite(decayed)
                block = block + l2 * decayed
            big &= ~(np.abs(block) <= limit)
            faults = {"nonfinite": bad, "huge": big}
            if storage_max is not None:
                v = 0.0 if flat_v is None else flat_v[start:stop].astype(work)
                m = 0.0 if flat_m is None else flat_m[start:stop].astype(work)
                new_v = config.beta2 * v + (1.0 - config.beta2) * (block * block)
                new_m = config.beta1 * m + (1.0 - config.beta1) * block
                fits = (np.abs(new_v) <= storage_max) & (np.abs(new_m) <= storage_max)
                # Moments already infinite, or a parameter that is, are not this gradient's doing.
                finite = np.isfinite(v) & np.isfinite(m) & np.isfinite(block)
                faults["storage"] = ~bad & ~big & ~fits & finite
            for name, mask in faults.items():
                count = int(np.count_nonzero(mask))
                if count:
                    counts[name] += count
                    first.setdefault(name, start + int(np.argmax(mask)))

    def where(index: int) -> str:
        position = tuple(int(i) for i in np.unravel_index(index, g.shape))
        return f"first at index {position}: {flat_g[index].item()}"

    def values(count: int) -> str:
        return f"{count} value{'' if count == 1 else 's'} of {g.size}"

    if counts["nonfinite"]:
        count = counts["nonfinite"]
        return (
            f"{count} NaN or infinite value{'' if count == 1 else 's'} of {g.size} "
            f"({where(first['nonfinite'])})"
        )
    if counts["huge"]:
        what = "whose L2-decayed value g + weight_decay * p or its square" if l2 else "whose square"
        return (
            f"{values(counts['huge'])} {what} overflows {work}, |g| > {float(limit):.4g} "
            f"({where(first['huge'])})"
        )
    if counts["storage"]:
        return (
            f"{values(counts['storage'])} for which a moment would overflow its storage dtype "
            f"{moments} (largest {storage_max:.4g}) ({where(first['storage'])})"
        )
    return None


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


def _prepare_array_api(
    leaves: list[Any],
    treedef: TreeDef,
    grads: Any,
    states: Sequence[LeafState | None],
    configs: Sequence[AdamConfig],
    in_place: bool,
    paths: LeafPaths,
) -> Step:
    """`prepare_step` for the arrays of one library other than NumPy."""
    lib = library(leaves[0])
    xp = namespace(leaves[0], paths[0])
    g_leaves = flatten_like(grads, treedef, "grads")
    g_paths = LeafPaths(treedef, "grads")
    moments = []
    for index, (p, g, config) in enumerate(zip(leaves, g_leaves, configs)):
        _same_library(p, lib, paths[index])
        if not xp.isdtype(p.dtype, "real floating"):
            raise TypeError(f"{paths[index]}: expected {_FLOAT_PARAMS}, got dtype {p.dtype}")
        if in_place and lib in ("jax", "dask"):
            raise TypeError(
                f"{paths[index]}: {lib} arrays cannot be updated in place; "
                "adam_update(params, grads, state, config) returns new ones"
            )
        if in_place and lib == "torch" and _read_only_tensor(p):
            raise TypeError(
                f"{paths[index]}: expected a tensor that can be written in place, got an "
                "inference tensor (made under torch.inference_mode()); step a clone of it"
            )
        _same_library(g, lib, g_paths[index])
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
            _check_fit(state, p, moments[index], configs[index], paths, index)
    lazy = any(is_lazy(a) for a in (*leaves, *g_leaves))
    taken = None
    skip_streak = 0
    for index, (p, g, config) in enumerate(zip(leaves, g_leaves, configs)):
        policy = config.nonfinite
        if policy == "propagate":
            continue
        if policy == "raise" and (is_traced(p) or is_traced(g)):
            raise TypeError(
                f"{paths[index]}: nonfinite='raise' cannot raise inside a traced function "
                "(jax.jit, vmap, scan, torch.func.vmap), where the values are not known; use "
                "AdamConfig(nonfinite='skip'), which selects with where, or 'propagate'"
            )
        fine = _finite_step(xp, p, g, config)
        if policy == "skip" and lazy:
            if config.max_consecutive_skips is not None:
                raise TypeError(
                    f"{paths[index]}: max_consecutive_skips cannot be enforced on lazy arrays "
                    "(under jax.jit or torch.func.vmap, or dask); leave it None there"
                )
            taken = fine if taken is None else xp.logical_and(taken, fine)
            continue
        if not bool(fine):  # On dask, "raise" computes the check here.
            streak = max((int(s.consecutive_skips) for s in states if s is not None), default=0)
            streak += 1
            problem = "NaN, infinity, or a value whose square overflows"
            if not _may_skip(config, streak):
                raise _nonfinite_error(problem, g_paths[index], config, streak)
            skip_streak = streak
    if skip_streak:
        return Step(list(leaves), list(g_leaves), None, [], moments, skip_streak, xp)
    coefficients = _coefficients(states, configs, xp)
    return Step(list(leaves), list(g_leaves), coefficients, [], moments, 0, xp, taken)


def _read_only_tensor(p: Any) -> bool:
    """Whether torch refuses to write tensor ``p`` in place here: an inference tensor, outside
    inference mode."""
    import torch

    return bool(p.is_inference()) and not torch.is_inference_mode_enabled()


def one_library(leaves: Sequence[Any], paths: LeafPaths) -> str | None:
    """The library of the leaves when it is not NumPy, else None.

    Raises:
      TypeError: the leaves are arrays of more than one library.
    """
    if not any(is_foreign(leaf) for leaf in leaves):
        return None
    lib = library(next(leaf for leaf in leaves if is_foreign(leaf)))
    for index, leaf in enumerate(leaves):
        _same_library(leaf, lib, paths[index])
    return lib


def _same_library(x: Any, lib: str, where: str) -> None:
    if not is_foreign(x) or library(x) != lib:
        got = "a NumPy array" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(
            f"{where}: expected a {lib} array like the other params, got {got}; one call takes "
            "the arrays of one library"
        )
    refuse_unsupported(x, where)


def _finite_step(xp: Any, p: Any, g: Any, config: AdamConfig) -> Any:
    """A 0-d boolean array: whether every value of ``g`` (after L2 decay) and its square are
    finite in the dtype the step computes in."""
    work = array_api_kernel.work_dtype(xp, p.dtype, p.dtype)
    gw = xp.astype(g, work)
    if config.weight_decay > 0 and not config.decoupled_weight_decay:
        pw = xp.astype(p, work)
        gw = gw + xp.where(xp.isfinite(pw), pw, xp.zeros_like(pw)) * config.weight_decay
    limit = float(np.sqrt(np.finfo(np.dtype(_numpy_name(xp, work))).max))
    return xp.all(xp.abs(gw) <= limit)  # False for NaN.


def _numpy_name(xp: Any, dtype: Any) -> str:
    for name in ("float16", "float32", "float64"):
        if getattr(xp, name, None) == dtype:
            return name
    raise TypeError(f"unsupported dtype {dtype}")


def _array_coefficients(
    xp: Any, config: AdamConfig, t: Any, state: LeafState | None
) -> Coefficients:
    """The scalars of a step whose count ``t`` is a 0-d integer array (under jax.jit)."""
    assert state is not None
    work = array_api_kernel.work_dtype(xp, state.m.dtype, state.m.dtype)
    tf = xp.astype(t, work)

    def correction(beta: float, steps: Any) -> Any:
        # 1 - beta**t as -expm1(t * log(beta)), with log(beta) from float64: within a few ulps
        # of the float64 value even in float32, where 1 - beta**t would lose up to 1e-5.
        if beta == 0.0:
            return xp.ones_like(steps)
        return -xp.expm1(steps * math.log(beta))

    lr = config.lr(t) if callable(config.lr) else config.lr
    decoupled = config.decoupled_weight_decay
    return Coefficients(
        lr,
        config.beta1,
        1.0 - config.beta1,
        config.beta2,
        1.0 - config.beta2,
        correction(config.beta1, tf),
        correction(config.beta2, tf),
        config.eps,
        config.weight_decay if config.weight_decay > 0 and not decoupled else 0.0,
        1.0 - lr * config.weight_decay if decoupled else None,
        config.maximize,
        config.amsgrad,
        correction(config.beta1, tf + 1.0) if config.nesterov else None,
        config.eps_root,
    )
