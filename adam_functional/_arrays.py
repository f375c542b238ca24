"""The arrays of a step: which library they belong to, and how the kernels can read them.

NumPy arrays take the tuned kernels as they are. An array of another library (JAX, PyTorch,
CuPy, dask, array-api-strict, ...) is recognised without importing its library; one call takes
the arrays of one library (`one_library`). Its namespace comes from ``array-api-compat`` (the
``[array-api]`` extra), imported at the first such array.

PyTorch tensors in CPU memory are seen as NumPy arrays (`views`), for the NumPy kernels to read
and write: what a kernel writes into a view, the tensor holds. So a step on CPU tensors takes the
same plan, kernels and bits as on NumPy arrays, where the array-API kernel would compute a dozen
new tensors and copy them back. torch's optimizers write parameters under ``torch.no_grad()``,
and each write bumps the tensor's version counter, so that autograd refuses a backward pass
through values a graph saved; `written` bumps the counters the same way. Only what a view shows
faithfully is viewed: a plain tensor or ``nn.Parameter`` on the CPU, strided, of a dtype NumPy
has, with no negative or conjugate bit, and not an inference tensor (which torch lets no one
write outside inference mode). Anything else takes the array-API kernel.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "EXTRA",
    "Views",
    "empty",
    "is_foreign",
    "is_lazy",
    "is_traced",
    "library",
    "namespace",
    "one_library",
    "plain",
    "refuse_unsupported",
    "to_numpy",
    "views",
    "written",
    "zeros",
]

#: How to install what arrays of other libraries need.
EXTRA = 'pip install "adam-functional[array-api]"'

# Libraries whose arrays are recognised by their type's module, for those that implement neither
# __array_namespace__ nor __dlpack__ (dask).
_KNOWN = frozenset({"jax", "jaxlib", "torch", "dask", "cupy", "array_api_strict", "sparse"})


def library(x: Any) -> str:
    """The library of ``x``'s type: ``"numpy"``, ``"jax"``, ``"torch"``, ..."""
    top = type(x).__module__.partition(".")[0]
    return "jax" if top == "jaxlib" else top  # JAX's concrete arrays are jaxlib's.


def is_foreign(x: Any) -> bool:
    """Whether ``x`` is an array of a library other than NumPy."""
    if isinstance(x, np.ndarray | np.generic):
        return False
    kind = type(x)
    return (
        hasattr(kind, "__array_namespace__") or hasattr(kind, "__dlpack__") or library(x) in _KNOWN
    )


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer, whose values are not known while a function is traced, or
    a tensor batched by ``torch.func.vmap``, whose values no Python branch may depend on."""
    lib = library(x)
    if lib == "jax":
        return "Tracer" in type(x).__name__
    if lib == "torch":
        import torch  # Imported already: x is one of its tensors.

        batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
        return batched is not None and bool(batched(x))
    return False


def is_lazy(x: Any) -> bool:
    """Whether ``x``'s values are unknown until later, or cannot be branched on: a JAX tracer,
    a tensor batched by ``torch.func.vmap``, or a dask array."""
    return is_traced(x) or library(x) == "dask"


def namespace(x: Any, where: str) -> ModuleType:
    """The array-API namespace of ``x``, through array-api-compat.

    Raises:
      TypeError: array-api-compat is not installed, or ``x`` has no namespace it knows.
    """
    try:
        import array_api_compat
    except ImportError:
        raise TypeError(
            f"{where}: got a {library(x)} array ({type(x).__name__}); arrays of libraries other "
            f"than NumPy need array-api-compat: {EXTRA}"
        ) from None
    try:
        xp: ModuleType = array_api_compat.array_namespace(x)
    except TypeError as error:
        raise TypeError(
            f"{where}: expected an array of a library that follows the array API standard, got "
            f"{type(x).__name__} ({error})"
        ) from None
    refuse_unsupported(x, where)
    return xp


def refuse_unsupported(x: Any, where: str) -> None:
    """Refuses an array of another library that holds no dense values of a known shape and a
    numeric dtype, which the array API computes on: a torch tensor that is sparse, MKL-DNN,
    nested, or on the meta device (no values at all); a dask array of unknown chunk sizes; a
    JAX array of PRNG keys; a torch or JAX array of float8 or float4, which these libraries
    neither compute nor promote with.

    Raises:
      TypeError: ``x`` is such a tensor, or an array of keys.
      ValueError: ``x``'s shape is not known.
    """
    lib = library(x)
    if lib in ("torch", "jax") and _byte_float(x.dtype, lib):
        raise TypeError(
            f"{where}: expected a floating-point dtype of 16 bits or more, got {x.dtype}, which "
            "has no arithmetic of its own; cast it first (to float32, say)"
        )
    if lib == "torch":
        import torch  # Imported already: x is one of its tensors.

        if x.is_nested:
            got, advice = "a nested tensor", "give each of its tensors as a leaf of the tree"
        elif x.layout != torch.strided:
            got, advice = f"a tensor of layout {x.layout}", "convert it with to_dense()"
        elif x.is_meta:
            got, advice = "a tensor on the meta device, which holds no values", "give real tensors"
        else:
            return
        raise TypeError(
            f"{where}: expected a dense tensor with values (layout torch.strided), got {got}; "
            f"{advice}"
        )
    if lib == "dask" and any(math.isnan(extent) for extent in x.shape):
        raise ValueError(
            f"{where}: expected an array of known shape, got a dask array of shape {x.shape} "
            "(unknown chunk sizes); call its compute_chunk_sizes() first"
        )
    if lib == "jax":
        import jax  # Imported already: x is one of its arrays.

        if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"{where}: expected an array of numbers, got an array of PRNG keys "
                f"(dtype {x.dtype})"
            )


def _byte_float(dtype: Any, lib: str) -> bool:
    """Whether ``dtype`` of ``lib`` (torch or JAX) is a floating-point type of one byte or less:
    float8 and float4, which the libraries store but do not compute or promote with."""
    if lib == "torch":
        return bool(dtype.is_floating_point) and dtype.itemsize == 1
    import jax  # Imported already: the array is one of its arrays.

    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating)) and dtype.itemsize == 1


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` in host memory (DLPack where it can, else ``np.asarray``)."""
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    if library(x) == "torch":
        x = x.detach().cpu()
    elif library(x) == "cupy":
        x = x.get()
    elif library(x) == "dask":
        x = x.compute()
    try:
        return np.array(np.from_dlpack(x), copy=True)
    except (TypeError, AttributeError, RuntimeError, BufferError, ValueError):
        return np.array(np.asarray(x), copy=True)


def plain(array: np.ndarray) -> np.ndarray:
    """``array`` as a plain ``ndarray`` over the same memory.

    A subclass can give ``reshape``, indexing and ufuncs another meaning (``np.matrix`` keeps
    two dimensions through ``reshape(-1)``); the kernels see its memory as a plain array.
    """
    return array if type(array) is np.ndarray else array.view(np.ndarray)


def describe(x: Any) -> str:
    """What ``x`` is, for an error: ``a NumPy array``, ``a torch Tensor``, ``a float``."""
    if isinstance(x, np.ndarray):
        return "a NumPy array"
    kind = type(x).__name__
    text = f"{library(x)} {kind}" if is_foreign(x) else kind
    return f"{'an' if text[0] in 'aeiou' else 'a'} {text}"


def one_library(leaves: Sequence[Any], paths: Any, grads: Sequence[Any] = ()) -> str:
    """The library of the parameter ``leaves`` (``"numpy"`` for NumPy arrays and scalars), which
    every gradient in ``grads`` must share.

    Raises:
      TypeError: a leaf belongs to another library than the first parameter; the message names
        that leaf, its library and the first parameter's.
    """
    first = next((leaf for leaf in leaves if is_foreign(leaf)), None)
    lib = "numpy" if first is None else library(first)
    reference = paths[0] if leaves and (first is None or first is leaves[0]) else "the other params"
    for index, leaf in enumerate(leaves):
        if (library(leaf) if is_foreign(leaf) else "numpy") != lib:
            _mixed(paths[index], lib, reference, leaf)
    for index, g in enumerate(grads):
        if (library(g) == lib) if is_foreign(g) else lib == "numpy":
            continue
        _mixed(paths.renamed("grads")[index], lib, "params", g)
    return lib


def _mixed(where: str, lib: str, reference: str, got: Any) -> None:
    name = "NumPy" if lib == "numpy" else lib
    raise TypeError(
        f"{where}: expected {'an' if name[0] in 'aeiou' else 'a'} {name} array like {reference}, "
        f"got {describe(got)}; one call takes the arrays of one library"
    )


# -------------------------------------------------------------------------------------------------
# PyTorch tensors in CPU memory, seen as NumPy arrays.


class Views(NamedTuple):
    """A step's parameters, gradients and moments as NumPy views of the tensors' memory."""

    params: list[np.ndarray]
    grads: list[np.ndarray]
    #: Per leaf, its moments ``(m, v, v_max)`` viewed, or None for a leaf without a state.
    moments: list[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None]


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
    g_leaves: Sequence[Any],
    moments: Sequence[tuple[Any, Any, Any] | None],
    *,
    pure: bool,
) -> Views | None:
    """The parameters, gradients and moments of a step as NumPy views, when every parameter is
    a floating-point torch tensor in CPU memory, every gradient one of real numbers, and every
    moment one of them too (or a NumPy array); else None. For the ``pure`` update, None too
    when autograd would record the step (a tensor requires gradients, outside
    ``torch.no_grad()``): then torch operations compute it, which autograd can differentiate."""
    torch = sys.modules.get("torch")
    if torch is None or not leaves:
        return None
    floating, real = _floating(torch), _real(torch)
    if not all(_viewable(torch, p, floating) for p in leaves):
        return None
    if not all(_viewable(torch, g, real, written=False) for g in g_leaves):
        return None
    if pure and torch.is_grad_enabled():
        held = [x for entry in moments if entry is not None for x in entry]
        if any(getattr(x, "requires_grad", False) for x in (*leaves, *g_leaves, *held)):
            return None
    viewed: list[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None] = []
    for entry in moments:
        if entry is None:
            viewed.append(None)
            continue
        m, v, v_max = (None if x is None else _moment(torch, x, pure) for x in entry)
        if m is None or v is None or (entry[2] is not None and v_max is None):
            return None
        viewed.append((m, v, v_max))
    p_views, g_views = [_view(p) for p in leaves], [_view(g) for g in g_leaves]
    if any(x is None for x in (*p_views, *g_views)):
        return None
    return Views(p_views, g_views, viewed)  # type: ignore[arg-type]


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
