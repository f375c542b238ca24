"""The one step of both APIs: it executes any plan that ``adam_functional._plan`` made.

`take` runs, in this order and for every route: the value checks of each group (the quick test
its plan names), one diagnosis when a check fails (`diagnose`: it names the first bad leaf and
raises, or decides that the step is skipped), the per-step scalars of one builder
(`kernels.coefficients`), and each group's kernel into the outputs the plan says: fresh arrays
for the pure update, the parameters and moments themselves in place, new tensors through their
NumPy views, new arrays of another library. `advance` is the one update of ``t``, ``skipped`` and
``consecutive_skips``. Every check runs before the first write, so a step that raises has
changed nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from adam_functional import kernels
from adam_functional._arrays import empty, is_lazy, to_numpy, written
from adam_functional._plan import Checked, Group, LeafState, Plan
from adam_functional._records import AdamConfig, seal
from adam_functional.kernels import Coefficients, Inputs, Outputs
from adam_functional.kernels import array_api as array_api_kernel
from adam_functional.kernels import numpy as reference

__all__ = ["Stepped", "advance", "check_values", "take"]

# Elements per step of the walk that looks at a gradient value by value.
_CHUNK = 8192


class Stepped(NamedTuple):
    """What a step did."""

    #: Per leaf, its new ``(p, m, v, v_max)`` in the caller's library (in place: the arrays
    #: written); None when the step is skipped.
    new: list[tuple[Any, Any, Any, Any]] | None
    #: True when the step is taken, False when skipped; under tracing (or on dask), a 0-d
    #: integer array, 1 where it is taken.
    taken: Any
    #: The flat arrays ``(p, m, v, v_max)`` of each batch of the pure update, by its leaves.
    flats: dict[tuple[int, ...], tuple[Any, ...]]


def take(checked: Checked, known: dict[tuple[int, ...], Any] | None = None) -> Stepped:
    """Checks the values of a step of ``checked`` and takes it (or skips it).

    ``known`` gives, for batches of the pure update, the flat arrays ``(p or None, m, v,
    v_max)`` the previous step made, which spare gathering them again.

    Raises:
      FloatingPointError: a gradient is not finite (or would overflow the moments) and its
        config says to raise (see `diagnose`).
      ValueError: a schedule gives an invalid rate.
    """
    plan = checked.plan
    gathered: dict[tuple[int, ...], np.ndarray] = {}
    taken = check_values(checked, gathered)
    if taken is False:
        return Stepped(None, False, {})
    coefficients = _scalars(plan, checked.states)
    if plan.xp is not None:
        new = _run_array_api(checked, coefficients, taken)
        if taken is not True:  # As a count of the counters' dtype, for `advance`.
            t = next((s.t for s in checked.states if s is not None), 0)
            taken = plan.xp.astype(taken, t.dtype if hasattr(t, "dtype") else plan.xp.int64)
        return Stepped(new, taken, {})
    if checked.tensors is not None:
        return _run_views(checked, coefficients)
    return _run_numpy(checked, coefficients, gathered, known or {})


def check_values(checked: Checked, gathered: dict[tuple[int, ...], np.ndarray]) -> Any:
    """The value checks of each group: True when the step may be taken, False when it is
    skipped, or a 0-d boolean array for a step decided with ``where``. A ``"batch"`` group's
    gradients are gathered into ``gathered``, where the run finds them.

    Raises:
      FloatingPointError: as `diagnose`.
    """
    plan, failed, flag = checked.plan, False, None
    for number, group in enumerate(plan.groups):
        check = group.check
        if check == "none" or check == "small":  # The small kernel checks as it computes.
            continue
        if check == "where":
            fine = _array_fine(checked, group.leaves[0])
            flag = fine if flag is None else plan.xp.logical_and(flag, fine)
        elif check == "batch":
            flat_g = _gathered([checked.grads[i] for i in group.leaves], f"g{number}")
            gathered[group.leaves] = flat_g
            failed = failed or not kernels.squares_fit(flat_g, flat_g.dtype)
        elif check == "array":
            failed = failed or not bool(_array_fine(checked, group.leaves[0]))
        else:
            failed = failed or any(_problem(checked, index, quick=True) for index in group.leaves)
    if failed and diagnose(checked):
        return False
    return True if flag is None else flag


def diagnose(checked: Checked) -> bool:
    """Looks at every checked leaf's gradient value by value: raises for the first bad one whose
    config says to raise, and returns whether the step is skipped (a bad one may be). A quick
    test may fail where no value is bad (a sum of squares that overflows): then False.

    Raises:
      FloatingPointError: the message names the leaf, what is wrong and the policy.
    """
    plan = checked.plan
    streak = 1 + max((int(s.consecutive_skips) for s in checked.states if s is not None), default=0)
    skip = False
    grads = checked.paths.renamed("grads")
    for index, config in enumerate(plan.configs):
        if config.nonfinite == "propagate":
            continue
        problem = _problem(checked, index, quick=False)
        if problem is None:
            continue
        if not _may_skip(config, streak):
            raise _nonfinite_error(problem, grads[index], config, streak)
        skip = True
    return skip


def advance(t: Any, skipped: Any, streak: Any, taken: Any) -> tuple[Any, Any, Any]:
    """The counters ``(t, skipped, consecutive_skips)`` after a step that was ``taken`` (True,
    False, or under tracing a 0-d integer array, 1 where it was). Counts held in arrays (JAX)
    stay arrays of their dtype, so that ``jit`` sees one signature."""
    if taken is True:
        return t + 1, skipped, streak * 0
    if taken is False:
        return t, skipped + 1, streak + 1
    return t + taken, skipped + (1 - taken), (streak + 1) * (1 - taken)


# -------------------------------------------------------------------------------------------------
# Values.


def _problem(checked: Checked, index: int, *, quick: bool) -> str | None:
    """What is wrong with the gradient of leaf ``index`` (see `_gradient_problem`), or None;
    ``quick`` says only whether something may be."""
    plan, state = checked.plan, checked.states[index]
    g, p, moments = checked.grads[index], checked.params[index], plan.moments[index]
    if plan.xp is not None:  # Looked at as NumPy arrays, so that each library hears the same.
        xp = plan.xp
        work = array_api_kernel.work_dtype(xp, p.dtype, moments)

        def host(x: Any) -> np.ndarray:
            return to_numpy(xp.astype(x, work))  # NumPy may lack the dtype (bfloat16).

        g, p, moments = host(g), host(p), _numpy_dtype(moments)
        if state is not None:
            state = state._replace(m=host(state.m), v=host(state.v))
    return _gradient_problem(g, p, moments, state, plan.configs[index], quick)


def _gradient_problem(
    g: np.ndarray,
    p: np.ndarray,
    moments: np.dtype,
    state: LeafState | None,
    config: AdamConfig,
    quick: bool = False,
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
    itself is too large (``np.vdot`` in chunks: no allocation, one read, no floating-point
    flags). With ``quick``, a failed sum says only that something may be wrong ("?"); else, and
    in the rarer configurations, the values are looked at one by one.
    """
    if g.size == 0:
        return None
    work = kernels.work_dtype(p.dtype, moments)
    l2 = config.weight_decay if config.weight_decay > 0 and not config.decoupled_weight_decay else 0
    if l2 == 0 and moments == work:
        if kernels.squares_fit(g, work):
            return None
        if quick:
            return "?"
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
    return _describe_fault(g, counts, first, work, limit, l2, moments, storage_max)


def _describe_fault(
    g: np.ndarray,
    counts: dict[str, int],
    first: dict[str, int],
    work: np.dtype,
    limit: Any,
    l2: float,
    moments: np.dtype,
    storage_max: float | None,
) -> str | None:
    def where(index: int) -> str:
        position = tuple(int(i) for i in np.unravel_index(index, g.shape))
        return f"first at index {position}: {g.reshape(-1)[index].item()}"

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
            f"it would make {streak} skips in a row, more than "
            f"AdamConfig.max_consecutive_skips={config.max_consecutive_skips}"
        )
    else:
        advice = "AdamConfig(nonfinite='skip') skips such steps"
    return FloatingPointError(
        f"{path}: expected finite gradients, got {problem}; nothing was changed. {advice}"
    )


def _array_fine(checked: Checked, index: int) -> Any:
    """A 0-d boolean array of another library: whether every value of leaf ``index``'s gradient
    (after L2 decay) and its square are finite in the dtype the step computes in, and the new
    moments fit their storage dtype."""
    plan, xp = checked.plan, checked.plan.xp
    p, g, config, state = (
        checked.params[index],
        checked.grads[index],
        plan.configs[index],
        checked.states[index],
    )
    moments = plan.moments[index]
    work = array_api_kernel.work_dtype(xp, p.dtype, moments)
    gw = xp.astype(g, work)
    if config.weight_decay > 0 and not config.decoupled_weight_decay:
        pw = xp.astype(p, work)
        gw = gw + xp.where(xp.isfinite(pw), pw, xp.zeros_like(pw)) * config.weight_decay
    limit = float(xp.finfo(work).max) ** 0.5
    fine = xp.all(xp.abs(gw) <= limit)  # False for NaN.
    if moments != work:  # Moments narrower than the arithmetic.
        largest = float(xp.finfo(moments).max)
        m = 0.0 if state is None else xp.astype(state.m, work)
        v = 0.0 if state is None else xp.astype(state.v, work)
        new_m = m * config.beta1 + gw * (1.0 - config.beta1)
        new_v = v * config.beta2 + (gw * gw) * (1.0 - config.beta2)
        # Moments already infinite are not this gradient's doing, as in `_find_bad_values`.
        fits = (xp.abs(new_m) <= largest) & (xp.abs(new_v) <= largest)
        fine = xp.logical_and(fine, xp.all(fits | ~(xp.isfinite(m) & xp.isfinite(v))))
    return fine


def _numpy_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of another library's floating-point ``dtype`` (``torch.float32``): of
    ``ml_dtypes`` for bfloat16, where it is installed; float32 where NumPy has none."""
    with contextlib.suppress(TypeError):
        found: np.dtype = np.dtype(dtype)
        return found
    name = str(dtype).rsplit(".", 1)[-1]
    with contextlib.suppress(TypeError):
        return np.dtype(name)
    named = getattr(sys.modules.get("ml_dtypes"), name, None)
    return np.dtype(named) if named is not None else np.dtype(np.float32)


# -------------------------------------------------------------------------------------------------
# Scalars.


def _scalars(plan: Plan, states: Sequence[LeafState | None]) -> list[Coefficients]:
    """The scalars of each config and step count (in the wrapper, arrays may have taken
    different numbers of steps); a schedule may raise here, still before anything is written."""
    configs = plan.configs
    first_config, first_state = configs[0] if configs else None, states[0] if states else None
    if (
        len(configs) > 1
        and all(c is first_config for c in configs)
        and all(
            s is first_state or (s is not None and first_state is not None and s.t is first_state.t)
            for s in states
        )
    ):  # One config and one count (the pure update's common case): one set of scalars.
        return _scalars(plan._replace(configs=configs[:1]), states[:1]) * len(configs)
    cache: dict[tuple[int, Any], Coefficients] = {}
    coefficients = []
    for index, (state, config) in enumerate(zip(states, configs)):
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
                xp, moments = plan.xp, plan.moments[index]
                work = array_api_kernel.work_dtype(xp, moments, moments)
                c = kernels.coefficients(config, count + 1, xp, work)
            cache[key] = c
        coefficients.append(c)
    return coefficients


# -------------------------------------------------------------------------------------------------
# Runs.


def _run_numpy(
    checked: Checked,
    coefficients: list[Coefficients],
    gathered: dict[tuple[int, ...], np.ndarray],
    known: dict[tuple[int, ...], Any],
) -> Stepped:
    """Runs a taken step on NumPy arrays: in place, or into fresh arrays (each batch into flat
    arrays of which each leaf gets a view; the moments sealed)."""
    plan = checked.plan
    count = len(checked.params)
    new: list[Any] = [None] * count
    flats = {}
    for number, group in enumerate(plan.groups):
        if len(group.leaves) > 1:
            flats[group.leaves] = _run_batch(checked, group, number, coefficients, gathered, known)
            new_flat = flats[group.leaves]
            offset = 0
            for index in group.leaves:
                p = checked.params[index]
                end = offset + p.size
                new[index] = tuple(
                    None if a is None else a[offset:end].reshape(p.shape) for a in new_flat
                )
                offset = end
            continue
        index = group.leaves[0]
        p, state = checked.params[index], checked.states[index]
        assert state is not None, "a step's states are there when it runs"
        if plan.in_place:
            out = Outputs(p, state.m, state.v, state.v_max)
        else:
            dtype = plan.moments[index]
            out = Outputs(
                np.empty(p.shape, p.dtype),
                np.empty(p.shape, dtype),
                np.empty(p.shape, dtype),
                np.empty(p.shape, dtype) if state.v_max is not None else None,
            )
        if not _run_leaf(checked, group, index, state, coefficients[index], out):
            return Stepped(None, False, {})
        if not plan.in_place:
            out = Outputs(out.p, seal(out.m), seal(out.v), out.v_max)
            if out.v_max is not None:
                out = out._replace(v_max=seal(out.v_max))
        new[index] = tuple(out)
    return Stepped(new, True, flats)


def _run_leaf(
    checked: Checked, group: Group, index: int, state: LeafState, c: Coefficients, out: Outputs
) -> bool:
    """Runs one leaf's kernel from ``state`` into ``out``; False when the step turns out to be
    skipped (the small kernel, which checks as it computes, found a bad value; nothing is
    written then)."""
    p, g = checked.params[index], checked.grads[index]
    if group.check == "small":
        plan = checked.plan
        assert plan.small is not None
        scalars = reference.small_scalars(plan.small, state.t + 1)
        if kernels.small_step((p, g, state.m, state.v, out.p, out.m, out.v), scalars):
            return True
        # A value the small kernel does not take: the checks of a leaf, then its kernel.
        checked_here = plan.configs[index].nonfinite != "propagate"
        if checked_here and _problem(checked, index, quick=True) and diagnose(checked):
            return False
    assert group.kernel is not None
    group.kernel(Inputs(p, g, state.m, state.v, state.v_max), c, out)
    return True


def _run_batch(
    checked: Checked,
    group: Group,
    number: int,
    coefficients: list[Coefficients],
    gathered: dict[tuple[int, ...], np.ndarray],
    known: dict[tuple[int, ...], Any],
) -> tuple[Any, ...]:
    """Runs one batch of the pure update into flat fresh arrays: its gradients gathered (by its
    check, or here), its parameters and moments too unless ``known`` has their flat arrays."""
    leaves = group.leaves
    first = leaves[0]
    c = coefficients[first]
    flat_g = gathered.get(leaves)
    if flat_g is None:
        flat_g = _gathered([checked.grads[i] for i in leaves], f"g{number}")
    flat = known.get(leaves)
    flat_p = None if flat is None else flat[0]
    if flat_p is None:
        flat_p = _gathered([checked.params[i] for i in leaves], "p")
    moments = None if flat is None else flat[1:]
    if moments is None:
        states = [checked.states[i] for i in leaves]
        moments = (
            _gathered([s.m for s in states], "m"),  # type: ignore[union-attr]
            _gathered([s.v for s in states], "v"),  # type: ignore[union-attr]
            _gathered([s.v_max for s in states], "v_max") if c.amsgrad else None,  # type: ignore[union-attr]
        )
    total, dtype = flat_g.shape[0], checked.params[first].dtype
    out = Outputs(
        np.empty(total, dtype),
        np.empty(total, dtype),
        np.empty(total, dtype),
        np.empty(total, dtype) if c.amsgrad else None,
    )
    assert group.kernel is not None
    group.kernel(Inputs(flat_p, flat_g, *moments), c, out)
    return (out.p, seal(out.m), seal(out.v), None if out.v_max is None else seal(out.v_max))


def _gathered(arrays: list[np.ndarray], name: str) -> np.ndarray:
    """``arrays`` one after the other in a scratch array of this thread (of their dtype)."""
    dtype = arrays[0].dtype
    total = sum(a.size for a in arrays)
    target = kernels.scratch(f"gather {name}", total, dtype)
    np.concatenate([a.reshape(-1) for a in arrays], out=target)
    return target


def _run_views(checked: Checked, coefficients: list[Coefficients]) -> Stepped:
    """Runs a taken step of CPU tensors on NumPy views of their memory: in place (then bumps
    the tensors' versions), or into new tensors."""
    plan, tensors = checked.plan, checked.tensors
    assert tensors is not None
    new: list[Any] = []
    for index, (p, state, c) in enumerate(zip(checked.params, checked.states, coefficients)):
        assert state is not None
        viewed = state._replace(**_viewed_moments(state))
        if plan.in_place:
            made: tuple[Any, ...] = (tensors[index], state.m, state.v, state.v_max)
            out = Outputs(p, viewed.m, viewed.v, viewed.v_max)
        else:
            dtype = plan.moments[index]
            made = (
                empty(p.shape, p.dtype),
                empty(p.shape, dtype),
                empty(p.shape, dtype),
                empty(p.shape, dtype) if state.v_max is not None else None,
            )
            out = Outputs._make(None if t is None else t.numpy() for t in made)
        if not _run_leaf(checked, plan.groups[index], index, viewed, c, out):
            return Stepped(None, False, {})
        new.append(made)
    if plan.in_place:
        written(tensors)
    return Stepped(new, True, {})


def _viewed_moments(state: LeafState) -> dict[str, Any]:
    """A state's moments as NumPy arrays: views of tensors, one per buffer (read and written:
    the kernels know an in-place step by identity)."""

    def viewed(x: Any) -> Any:
        return x if x is None or isinstance(x, np.ndarray) else x.detach().numpy()

    return {"m": viewed(state.m), "v": viewed(state.v), "v_max": viewed(state.v_max)}


def _run_array_api(checked: Checked, coefficients: list[Coefficients], taken: Any) -> list[Any]:
    """Runs a taken step on another library's arrays with the array-API kernel: new arrays,
    leaf by leaf (each the old one where a step decided with ``where`` is not taken); in place,
    the parameters are written with them, outside autograd."""
    plan = checked.plan
    xp, results = plan.xp, []
    torch = sys.modules.get("torch")
    quiet = torch.no_grad() if torch is not None else contextlib.nullcontext()
    for p, g, state, c in zip(checked.params, checked.grads, checked.states, coefficients):
        assert state is not None
        new = array_api_kernel.adam_leaf(xp, Inputs(p, g, state.m, state.v, state.v_max), c)
        if taken is not True:
            old = (p, state.m, state.v, state.v_max)
            new = Outputs._make(
                None if a is None else xp.where(taken, a, b) for a, b in zip(new, old)
            )
        if plan.in_place:
            with quiet:  # Parameters that require gradients are written outside autograd.
                p[...] = new.p
            new = new._replace(p=p)
        results.append(tuple(new))
    return results
