"""Arrays of other libraries: recognising them, their array-API namespace, and NumPy copies.

NumPy arrays take the tuned kernels and never come here. An array of another library (JAX,
PyTorch, CuPy, dask, array-api-strict, ...) is recognised without importing its library, and
its namespace comes from ``array-api-compat`` (the ``[array-api]`` extra), imported at the
first such array.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "EXTRA",
    "is_array",
    "is_foreign",
    "is_lazy",
    "is_traced",
    "library",
    "namespace",
    "refuse_unsupported",
    "to_numpy",
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


def is_array(x: Any) -> bool:
    """Whether ``x`` is a leaf of a tree: a NumPy array or another library's."""
    return isinstance(x, np.ndarray) or is_foreign(x)


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
