"""bfloat16 outside torch: NumPy holds it as ml_dtypes' type (as JAX's arrays do), if installed.

NumPy has no bfloat16 of its own; ``ml_dtypes.bfloat16`` (the ``ml_dtypes`` package, which JAX
installs) is the type NumPy arrays of bfloat16 have. torch cannot hand such arrays to NumPy or
take them back, so its tensors cross as their 16 bits (``int16``), bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["from_torch", "is_bfloat16", "numpy_dtype", "to_torch"]

#: How to install what NumPy arrays of bfloat16 need.
ADVICE = "NumPy holds bfloat16 only with ml_dtypes: pip install ml_dtypes"


def numpy_dtype() -> np.dtype | None:
    """NumPy's dtype for bfloat16 (ml_dtypes'), or None where ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    dtype: np.dtype = np.dtype(ml_dtypes.bfloat16)
    return dtype


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype``, of NumPy or another library, is bfloat16."""
    return str(dtype).rpartition(".")[2] == "bfloat16"


def from_torch(tensor: Any, where: str) -> np.ndarray:
    """A NumPy copy, in host memory, of a torch bfloat16 ``tensor``, bit for bit.

    Raises:
      ValueError: ml_dtypes is not installed; the message starts with ``where``.
    """
    dtype = numpy_dtype()
    if dtype is None:
        raise ValueError(f"{where}: cannot store a bfloat16 tensor as NumPy data; {ADVICE}")
    import torch  # Imported already: tensor is one of its tensors.

    bits = tensor.detach().cpu().contiguous().view(torch.int16).numpy()
    array: np.ndarray = bits.view(dtype).copy()
    return array


def to_torch(array: np.ndarray, where: str) -> Any:
    """A torch bfloat16 tensor on the CPU with the values of a NumPy bfloat16 ``array``.

    Raises:
      ValueError: torch is not installed; the message starts with ``where``.
    """
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{where}: bfloat16 moments are restored as torch tensors, and torch is not installed"
        ) from None
    bits = np.array(array, order="C").view(np.int16)
    return torch.from_numpy(bits).view(torch.bfloat16)
