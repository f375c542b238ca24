"""PyTorch tensors in CPU memory, seen as NumPy arrays, for the NumPy kernels to read and write.

A view shares its tensor's memory: what a kernel writes into it, the tensor holds. So `Adam.step`
on CPU tensors takes the same checked step, kernels and bits as on NumPy arrays, writing the
tensors in place, where the array-API kernel would compute new tensors (a dozen of them, each as
large as the parameter) and copy them back; and `adam_update` writes its results into new
tensors through their views.

torch's optimizers write parameters under ``torch.no_grad()``, and each write bumps the tensor's
version counter, so that autograd refuses a backward pass through values that a graph saved and
the step then overwrote; `written` bumps the counters the same way.

Only what a view can show faithfully is viewed: a plain tensor or ``nn.Parameter`` on the CPU,
strided, of a dtype NumPy has, with no negative or conjugate bit, and not an inference tensor
(which torch lets no one write outside inference mode). Anything else takes the array-API path,
and its messages.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from adam_functional._step import LeafState
from adam_functional._tree import TreeDef, flatten_like, unflatten

__all__ = ["Views", "empty", "views", "written", "zeros"]


class Views(NamedTuple):
    """A step's inputs as NumPy views of the tensors' memory."""

    params: list[np.ndarray]
    #: A tree like the parameters'.
    grads: Any
    states: list[LeafState | None]


def _viewable(torch: Any, t: Any, dtypes: frozenset[Any], *, written: bool = True) -> bool:
    """Whether ``t`` can be viewed; one that is ``written`` must not be an inference tensor."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype in dtypes
        and t.device.type == "cpu"
        and t.layout is torch.strided
        and not (t.is_neg() or t.is_conj() or (written and t.is_inference()))
    )


def _view(t: Any) -> np.ndarray | None:
    """A NumPy view of ``t``'s memory, or None where torch has none to give (a ZeroTensor, a
    tensor wrapped by ``torch.func``)."""
    try:
        return t.detach().numpy()  # type: ignore[no-any-return]
    except (RuntimeError, TypeError):
        return None


_DTYPES: dict[str, frozenset[Any]] = {}


def _floating(torch: Any) -> frozenset[Any]:
    found = _DTYPES.get("floating")
    if found is None:
        found = _DTYPES["floating"] = frozenset({torch.float16, torch.float32, torch.float64})
    return found


def _real(torch: Any) -> frozenset[Any]:
    found = _DTYPES.get("real")
    if found is None:
        integers = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
        found = _DTYPES["real"] = _floating(torch) | integers
    return found


def _moment(torch: Any, x: Any, pure: bool) -> np.ndarray | None:
    """A view of a moment buffer (a NumPy one as it is), or None when it cannot be viewed; one
    that `Adam.step` writes in place must be C-contiguous, as the kernels write moments."""
    if isinstance(x, np.ndarray):
        return x
    if not _viewable(torch, x, _floating(torch), written=not pure):
        return None
    if not (pure or x.is_contiguous()):
        return None
    return _view(x)


def views(
    leaves: Sequence[Any],
    grads: Any,
    treedef: TreeDef,
    states: Sequence[LeafState | None],
    *,
    pure: bool = False,
) -> Views | None:
    """The parameters, gradients and states of a step as NumPy views, when every parameter is a
    floating-point torch tensor in CPU memory, every gradient one of real numbers, and every
    moment one of them too (or a NumPy array); else None. For the ``pure`` update, None too when
    autograd would record the step (a tensor requires gradients, outside ``torch.no_grad()``):
    then torch operations compute it, which autograd can differentiate.

    Raises:
      ValueError: the gradients differ from the parameters in structure (as the step would say).
    """
    torch = sys.modules.get("torch")
    if torch is None or not leaves:
        return None
    floating, real = _floating(torch), _real(torch)
    if not all(_viewable(torch, p, floating) for p in leaves):
        return None
    g_leaves = flatten_like(grads, treedef, "grads")
    if not all(_viewable(torch, g, real, written=False) for g in g_leaves):
        return None
    if pure and torch.is_grad_enabled():
        moments = [x for s in states if s is not None for x in (s.m, s.v, s.v_max)]
        if any(getattr(x, "requires_grad", False) for x in (*leaves, *g_leaves, *moments)):
            return None
    viewed_states: list[LeafState | None] = []
    for state in states:
        if state is None:
            viewed_states.append(None)
            continue
        m, v = _moment(torch, state.m, pure), _moment(torch, state.v, pure)
        v_max = None if state.v_max is None else _moment(torch, state.v_max, pure)
        if m is None or v is None or (state.v_max is not None and v_max is None):
            return None
        viewed_states.append(state._replace(m=m, v=v, v_max=v_max))
    p_views, g_views = [_view(p) for p in leaves], [_view(g) for g in g_leaves]
    if any(x is None for x in (*p_views, *g_views)):
        return None
    return Views(p_views, unflatten(treedef, g_views), viewed_states)  # type: ignore[arg-type]


def zeros(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A C-contiguous CPU tensor of zeros of the NumPy floating-point ``dtype``: moments, which
    the kernels write in C order.

    Raises:
      TypeError: torch has no such dtype (longdouble).
    """
    return sys.modules["torch"].zeros(shape, dtype=_torch_dtype(dtype))


def empty(shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """As `zeros`, with whatever values the memory held."""
    return sys.modules["torch"].empty(shape, dtype=_torch_dtype(dtype))


def _torch_dtype(dtype: np.dtype) -> Any:
    torch = sys.modules["torch"]
    found = getattr(torch, dtype.name, None)
    if found not in _floating(torch):
        raise TypeError(f"AdamConfig.moment_dtype: {dtype} is not a dtype of torch")
    return found


def written(tensors: Sequence[Any]) -> None:
    """Tells autograd that ``tensors`` were written in place, as a write under
    ``torch.no_grad()`` does."""
    sys.modules["torch"].autograd.graph.increment_version(tensors)
