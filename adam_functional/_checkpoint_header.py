"""What both versions of a checkpoint file share besides the tree: the header's entries.

Every file names its ``"format"`` (`FORMAT_NAME`), its ``"version"`` and its ``"kind"`` (one of
`KINDS`), and carries a SHA-256 of its header and its arrays, each array counted as its
``[..., dtype, shape]`` label as JSON (sorted keys, no spaces, ASCII) then its bytes in C order.
Arrays are numeric only: an object, string, structured or datetime dtype is refused.

JSON from a file is parsed only within bounds set by the file's size (its *basis*, see
`_checkpoint_tree`): it is at most 64 MiB; before it is parsed, its tokens (brackets, commas and
colons outside strings) are counted, at most one per 8 bytes of the basis plus 4096; and an int in
it has at most 20 digits (the "int" nodes of the tree hold larger ones as strings).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any, Literal, TypeAlias

import numpy as np

from adam_functional import _bfloat16

#: The ``"format"`` entry of every file.
FORMAT_NAME = "adam_functional.checkpoint"
#: The format version this release writes; `load` reads every version up to it.
FORMAT_VERSION = 2

Kind: TypeAlias = Literal["AdamState", "AdamConfig", "tree", "state_dict"]
#: What a checkpoint file can hold, named by its header's ``"kind"``.
KINDS: tuple[Kind, ...] = ("AdamState", "AdamConfig", "tree", "state_dict")

#: The largest extent, and the most bytes, that an array may have: NumPy's index type holds no more.
MAX_SIZE = int(np.iinfo(np.intp).max)

# The most JSON a file may hold, and how much of it its size allows (see the module docstring).
MAX_TREE_BYTES = 1 << 26
_BYTES_PER_TOKEN = 8
_FREE_TOKENS = 4096
# The longest int JSON may hold outside an "int" node (an index, a size); anything longer is
# refused before Python converts it.
_MAX_JSON_INT_DIGITS = 20
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


class Refusal(ValueError):
    """Why a file (or, on save, an object) is refused, and where: in the header, at a tree path."""

    def __init__(self, detail: str, *, path: str | None = None, in_header: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path = path
        self.in_header = in_header

    def for_file(self, name: str) -> ValueError:
        """The error ``load`` raises: the file, then where in it."""
        where = "header: " if self.in_header else ""
        if self.path is not None:
            where += f"tree{self.path}: "
        return ValueError(f"{name}: {where}{self.detail}")

    def for_object(self) -> ValueError:
        """The error ``save`` raises: the path in the object saved."""
        return ValueError(f"obj{self.path or ''}: {self.detail}")


def canonical_json(value: Any) -> bytes:
    """The JSON a checksum covers: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def c_order(array: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    return array if array.flags.c_contiguous else array.copy(order="C")


def dtype_label(dtype: np.dtype) -> str:
    """A dtype as the checksum names it: as NumPy writes it (``"<f8"``), bfloat16 as
    ``"bfloat16"`` (NumPy writes ml_dtypes' type as ``"<V2"``, as any two bytes)."""
    return "bfloat16" if _bfloat16.is_bfloat16(dtype) else dtype.str


def update_digest(digest: Any, label: Any, array: np.ndarray) -> None:
    """Adds an array to a checksum: ``label`` as canonical JSON, then its bytes in C order."""
    digest.update(canonical_json(label))
    digest.update(c_order(array).reshape(-1).view(np.uint8).data)


def new_digest(entries: dict[str, Any]) -> Any:
    """A SHA-256 that starts with the header ``entries`` other than ``"sha256"``."""
    return hashlib.sha256(canonical_json({k: v for k, v in entries.items() if k != "sha256"}))


# -------------------------------------------------------------------------------------------------
# Header entries, the same in both versions.


def check_header(entries: dict[str, Any], versions: range) -> Kind:
    """Checks ``"format"``, ``"version"`` (in ``versions``) and ``"kind"``; returns the kind.

    ``"version"`` is an int here; the caller turns the stored form into one (or None).
    """
    fmt = entries.get("format")
    if fmt != FORMAT_NAME:
        raise Refusal(
            f"not an adam_functional checkpoint: expected format {FORMAT_NAME!r}, got {fmt!r}"
        )
    version = entries.get("version")
    if type(version) is int and version > FORMAT_VERSION:
        raise Refusal(
            f"format version {version}, written by a newer adam_functional; this release reads "
            f"versions up to {FORMAT_VERSION}: upgrade adam_functional to load it"
        )
    if type(version) is not int or version not in versions:
        raise Refusal(
            f"expected a format version in {versions.start} to {versions.stop - 1} for this kind "
            f"of file, got {version!r}"
        )
    kind = entries.get("kind")
    if kind not in KINDS:
        raise Refusal(f"expected a kind among {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind  # type: ignore[no-any-return]


def check_entries(entries: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(entries))
    unknown = sorted(set(entries) - required - optional)
    if missing or unknown:
        raise Refusal(
            "damaged checkpoint:"
            f"{f' missing entries {missing}' if missing else ''}"
            f"{f' unknown entries {unknown}' if unknown else ''}"
        )


def check_sha256(stored: Any, digest: Any) -> None:
    if not (isinstance(stored, str) and re.fullmatch(r"[0-9a-f]{64}", stored)):
        raise Refusal(f"expected 'sha256' as 64 hex digits, got {stored!r}")
    if digest.hexdigest() != stored:
        raise Refusal(
            f"corrupted checkpoint: checksum mismatch (the header says sha256 {stored[:16]}..., "
            f"the contents give {digest.hexdigest()[:16]}...); the file changed after it was "
            "written",
            in_header=False,
        )


# -------------------------------------------------------------------------------------------------
# Arrays, as the header describes them.


def numeric_problem(dtype: np.dtype) -> str | None:
    """Why an array of ``dtype`` cannot be stored without pickle, or None when it can."""
    if _bfloat16.is_bfloat16(dtype) and dtype.itemsize == 2:
        return None  # ml_dtypes' bfloat16, stored as safetensors' BF16.
    if dtype.kind == "O":
        reason = "an object array, which would need pickle"
    elif dtype.fields is not None or dtype.subdtype is not None:
        reason = "a structured dtype"
    elif dtype.kind not in "biufc":
        reason = "not a numeric dtype"
    else:
        return None
    return (
        f"expected a numeric array (bool, int, uint, float or complex), got dtype {dtype} "
        f"({reason})"
    )


def dtype_of(text: Any) -> np.dtype:
    """The numeric dtype that ``text`` spells as NumPy writes it, else a Refusal."""
    try:
        dtype = np.dtype(text) if isinstance(text, str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype is None:
        raise Refusal(f"expected a dtype string, got {short(text)}")
    problem = numeric_problem(dtype)
    if problem is not None:
        raise Refusal(f"{problem}; checkpoint.load never unpickles")
    if dtype.str != text:
        raise Refusal(f"expected a dtype string as numpy writes it, got {text!r}")
    return dtype


def shape_of(value: Any, dtype: np.dtype) -> tuple[int, ...]:
    """The shape that ``value`` (a JSON list) spells for an array of ``dtype``, else a Refusal.

    NumPy holds an array only if each extent, and the bytes of its non-zero extents together,
    fit its index type: ``[2**63, 0]`` holds no byte, and NumPy still refuses it.
    """
    if (
        not isinstance(value, list)
        or len(value) > 64
        or not all(type(n) is int and n >= 0 for n in value)
    ):
        raise Refusal(f"expected a shape, a list of at most 64 ints >= 0, got {short(value)}")
    if max(value, default=0) > MAX_SIZE or _size(value) * dtype.itemsize > MAX_SIZE:
        raise Refusal(
            f"expected a shape NumPy can hold for dtype {dtype.str} (each extent, and the bytes "
            f"of the non-zero extents together, at most {MAX_SIZE}), got {short(value)}"
        )
    return tuple(value)


def _size(shape: list[int]) -> int:
    # Exact for any shape: a product of int64 could wrap around.
    return math.prod(extent for extent in shape if extent)


def nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return dtype.itemsize * math.prod(shape)


# -------------------------------------------------------------------------------------------------
# JSON, parsed within bounds.


def parse_json(text: str, basis: int) -> Any:
    """Parses ``text`` once its size and its count of JSON tokens fit ``basis`` bytes of file."""
    if len(text) > MAX_TREE_BYTES:
        raise Refusal(f"the JSON is {len(text)} bytes, more than the {MAX_TREE_BYTES} allowed")
    tokens = sum(map(_JSON_STRING.sub("", text).count, "[{,:"))
    limit = _FREE_TOKENS + basis // _BYTES_PER_TOKEN
    if tokens > limit:
        raise Refusal(
            f"the JSON holds {tokens} tokens, more than the {limit} that {basis} bytes of "
            f"checkpoint allow (one per {_BYTES_PER_TOKEN} bytes, plus {_FREE_TOKENS}); store "
            "large numeric data as arrays"
        )
    try:
        return json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise Refusal("the JSON is nested too deeply") from None
    except ValueError as error:  # json.JSONDecodeError, and the two refusals above.
        raise Refusal(f"corrupted checkpoint: not valid JSON ({error})") from None


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"an int of {digits} digits, more than {_MAX_JSON_INT_DIGITS}")
    return int(text)


def _json_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


# -------------------------------------------------------------------------------------------------
# Floats, as text: exact, NaNs included.

# The bits of Python's NaN (float("nan"), math.nan), which the text "nan" stands for.
_NAN_BITS = struct.unpack("<Q", struct.pack("<d", math.nan))[0]
_NAN_TEXT = re.compile("nan:0x[0-9a-f]{16}")


def float_text(number: float) -> str:
    """``number`` as text, one spelling per float: its ``repr``, except a NaN other than
    Python's own, which is ``"nan:0x"`` and the 16 hex digits of its bits, so that its sign and
    payload are kept."""
    if number == number:
        return repr(number)
    bits = struct.unpack("<Q", struct.pack("<d", number))[0]
    return "nan" if bits == _NAN_BITS else f"nan:0x{bits:016x}"


def parse_float(text: str) -> float | None:
    """The float whose `float_text` is ``text``, or None."""
    if _NAN_TEXT.fullmatch(text):
        number: float = struct.unpack("<d", struct.pack("<Q", int(text[6:], 16)))[0]
    else:
        try:
            number = float(text)
        except ValueError:
            return None
    return number if float_text(number) == text else None


def short(value: Any) -> str:
    """A value read from a file, for an error message: short, whatever the file holds."""
    if isinstance(value, dict | list) and (
        len(value) > 8 or not all(type(item) in (str, int, bool, float) for item in value)
    ):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
