"""PyTorch tensors in CPU memory, seen as NumPy arrays, for `Adam.step` to write in place.

A view shares its tensor's memory: what the NumPy backends' in-place kernels write into it, the
tensor holds. So `Adam.step` on CPU tensors takes the same checked step, kernels and bits as on
NumPy arrays, where the array-API kernel would compute new tensors (a dozen of them, each as
large as the parameter) and copy them back.

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

__all__ = ["Views", "views", "written"]


class Views(NamedTuple):
    """A step's inputs as NumPy views of the tensors' memory."""

    params: list[np.ndarray]
    #: A tree like the parameters'.
    grads: Any
    states: list[LeafState | None]


def _viewable(torch: Any, t: Any, dtypes: frozenset[Any]) -> bool:
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype in dtypes
        and t.device.type == "cpu"
        and t.layout is torch.strided
        and not (t.is_neg() or t.is_conj() or t.is_inference())
    )


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


def moment(torch: Any, x: Any) -> np.ndarray | None:
    """A view of a moment buffer (a NumPy one as it is), or None when it cannot be viewed."""
    if isinstance(x, np.ndarray):
        return x
    return x.detach().numpy() if _viewable(torch, x, _floating(torch)) else None


def views(
    leaves: Sequence[Any], grads: Any, treedef: TreeDef, states: Sequence[LeafState | None]
) -> Views | None:
    """The parameters, gradients and states of a step as NumPy views, when every parameter is a
    floating-point torch tensor in CPU memory, every gradient one of real numbers, and every
    moment one of them too (or a NumPy array); else None.

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
    if not all(_viewable(torch, g, real) for g in g_leaves):
        return None
    viewed_states: list[LeafState | None] = []
    for state in states:
        if state is None:
            viewed_states.append(None)
            continue
        m, v = moment(torch, state.m), moment(torch, state.v)
        v_max = None if state.v_max is None else moment(torch, state.v_max)
        if m is None or v is None or (state.v_max is not None and v_max is None):
            return None
        viewed_states.append(state._replace(m=m, v=v, v_max=v_max))
    return Views(
        [p.detach().numpy() for p in leaves],
        unflatten(treedef, [g.detach().numpy() for g in g_leaves]),
        viewed_states,
    )


def torch_dtype(dtype: np.dtype) -> Any:
    """The torch dtype of a NumPy floating-point dtype."""
    return getattr(sys.modules["torch"], dtype.name)


def written(tensors: Sequence[Any]) -> None:
    """Tells autograd that ``tensors`` were written in place, as a write under
    ``torch.no_grad()`` does."""
    sys.modules["torch"].autograd.graph.increment_version(tensors)
