"""The plain-data form of an optimizer's state: `Adam.state_dict` and `Adam.load_state_dict`.

A state dict holds no class of this package, only dicts, lists, NumPy arrays and Python scalars, so
it can be stored without pickle::

    {
        "format": "adam_functional.Adam",   # FORMAT
        "version": 1,                       # VERSION; a newer one is refused
        "config": {"lr": 0.001, "beta1": 0.9, ...},   # AdamConfig's fields (None ones left out),
                                                      # lr a number or schedules.to_dict(...)
        "state": [                          # one entry per array, in first-step order
            {"m": array, "v": array, "t": 3, "skipped": 0, "consecutive_skips": 0},
            ...                             # "v_max" too when amsgrad
        ],
        "names": ["w", "b", ...],           # optional: one name per entry
    }

Scalars may also come as 0-d arrays, as after a round trip through ``np.savez``. A schedule nests
at most `MAX_DEPTH` levels of dicts and lists, and contains no dict or list twice. `build` makes the
dict; `parse` checks one strictly (every key, kind, range and shape) and turns it back into
records, so that nothing it returns can surprise a kernel.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from adam_functional import _bfloat16, _tree, schedules
from adam_functional._records import AdamConfig, AdamState

__all__ = ["FORMAT", "MAX_DEPTH", "VERSION", "build", "fit_by_name", "fit_in_order", "parse"]

#: The ``format`` entry of a state dict.
FORMAT = "adam_functional.Adam"
#: The version this release writes; `parse` reads every version up to it. Version 1 (0.1) had no
#: ``nesterov``, ``eps_root`` and ``moment_dtype``; its moments had the parameters' dtype.
VERSION = 2

_KEYS = ("format", "version", "config", "state")
_OPTIONAL_KEYS = ("names",)
_COUNTS = ("t", "skipped", "consecutive_skips")
_FLAGS = ("decoupled_weight_decay", "amsgrad", "maximize", "nesterov")
_OPTIONAL = ("max_consecutive_skips",)
_CONFIG_FIELDS = tuple(field.name for field in attrs.fields(AdamConfig))
# Fields that version 1 did not have, with the values that give its behaviour.
_NEW_IN_2 = {"nesterov": False, "eps_root": 0.0, "moment_dtype": "params"}
# moment_dtype is stored as a string; None (the default) as this word.
_DEFAULT_MOMENTS = "default"
#: The most levels of dicts and lists a learning-rate schedule nests (a `Join` inside a `Join`
#: takes two), as in a checkpoint's tree: deeper, or cyclic, is refused before it is read.
MAX_DEPTH = 100


def build(
    config: AdamConfig, states: Sequence[AdamState], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Returns the state dict of ``config`` and one `AdamState` per array (arrays copied).

    Raises:
      TypeError: the learning rate is a custom callable, which is not plain data.
    """
    lr = config.lr
    # A field left at None is left out (np.savez cannot store None); parsing restores it.
    fields = {k: v for k, v in attrs.asdict(config, recurse=False).items() if v is not None}
    moments = config.moment_dtype
    fields["moment_dtype"] = _DEFAULT_MOMENTS if moments is None else str(moments)
    if not isinstance(lr, float):
        try:
            fields["lr"] = schedules.to_dict(lr)
        except TypeError as error:
            raise TypeError(
                f"Adam.state_dict: the learning rate {lr!r} cannot be stored as plain data "
                "(only numbers and the schedules of adam_functional.schedules can); pickle "
                "the optimizer instead"
            ) from error
    entries = []
    for position, state in enumerate(states):
        entry: dict[str, Any] = {}
        for name in ("m", "v", "v_max"):
            moments = getattr(state, name)
            if moments is not None:
                entry[name] = _host(moments, f"state_dict['state'][{position}][{name!r}]")
        entry.update((name, getattr(state, name)) for name in _COUNTS)
        entries.append(entry)
    result: dict[str, Any] = {"format": FORMAT, "version": VERSION, "config": fields}
    result["state"] = entries
    if names is not None:
        result["names"] = list(names)
    return result


def _host(moments: Any, where: str) -> np.ndarray:
    """A NumPy copy of ``moments`` in host memory; torch's bfloat16 as ml_dtypes' bfloat16."""
    if type(moments).__module__.partition(".")[0] == "torch":
        if _bfloat16.is_bfloat16(moments.dtype):
            return _bfloat16.from_torch(moments, where)
        return np.array(moments.detach().cpu().numpy())
    return np.array(moments)


def parse(state_dict: Any) -> tuple[AdamConfig, list[AdamState], list[str] | None]:
    """Checks a state dict and returns its config, one `AdamState` per entry, and the names.

    Raises:
      ValueError: the dict is malformed (a missing or unknown key, a value out of range, arrays
        of different shapes within an entry) or from a newer release.
      TypeError: a value is of the wrong kind.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
    _check_keys(state_dict, _KEYS, _OPTIONAL_KEYS, "state_dict")
    fmt = _scalar(state_dict["format"], "state_dict['format']", str)
    if fmt != FORMAT:
        raise ValueError(f"state_dict['format']: expected {FORMAT!r}, got {fmt!r}")
    version = _scalar(state_dict["version"], "state_dict['version']", int)
    if not 1 <= version <= VERSION:
        raise ValueError(
            f"state_dict['version']: expected 1 to {VERSION}, got {version}; a newer "
            "adam_functional wrote it"
        )
    config = _parse_config(state_dict["config"], version)
    entries = state_dict["state"]
    if not isinstance(entries, list | tuple):
        raise TypeError(f"state_dict['state']: expected a list, got {type(entries).__name__}")
    states = [
        _parse_entry(entry, config, f"state_dict['state'][{position}]")
        for position, entry in enumerate(entries)
    ]
    names = _parse_names(state_dict.get("names"), len(states))
    return config, states, names


def _check_keys(
    mapping: Mapping[Any, Any], required: Sequence[str], optional: Sequence[str], where: str
) -> None:
    for key in required:
        if key not in mapping:
            raise ValueError(f"{where}: expected the key {key!r}, got keys {list(mapping)}")
    unknown = [key for key in mapping if key not in required and key not in optional]
    if unknown:
        raise ValueError(
            f"{where}: unexpected keys {unknown!r}; expected only {[*required, *optional]!r}"
        )


def _scalar(value: Any, where: str, kind: type) -> Any:
    """Unwraps a 0-d array (as ``np.savez`` gives back) into a Python scalar of ``kind``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise TypeError(
            f"{where}: expected {kind.__name__}, got {type(value).__name__} {_show(value)}"
        )
    if kind is float:
        return _finite_float(value, where)
    return kind(value)


def _show(value: Any) -> str:
    """A short repr: never a whole array, never an int of thousands of digits."""
    if isinstance(value, np.ndarray | str | bytes | Mapping | list | tuple) or (
        isinstance(value, int) and value.bit_length() > 64
    ):
        return f"of size {len(value)}" if hasattr(value, "__len__") else "(too large to show)"
    return repr(value)


def _finite_float(value: Any, where: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{where}: expected a float, got an int too large for one") from None


def _unwrap_scalars(value: Any, where: str, parents: tuple[Any, ...] = ()) -> Any:
    """Turns the 0-d arrays that ``np.savez`` gives back into Python scalars, recursively, in a
    tree of at most `MAX_DEPTH` levels that does not contain itself."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if not isinstance(value, Mapping | list | tuple):
        return value
    if any(value is parent for parent in parents):
        raise ValueError(
            f"{where}: expected a schedule as plain data, got a {type(value).__name__} that "
            "contains itself"
        )
    if len(parents) >= MAX_DEPTH:
        raise ValueError(
            f"{where}: expected a schedule nested at most {MAX_DEPTH} levels deep (a Join "
            "takes two), got a deeper one"
        )
    parents = (*parents, value)
    if isinstance(value, Mapping):
        return {
            key: _unwrap_scalars(item, f"{where}[{key!r}]", parents) for key, item in value.items()
        }
    return [_unwrap_scalars(item, f"{where}[{index}]", parents) for index, item in enumerate(value)]


def _parse_config(raw: Any, version: int) -> AdamConfig:
    where = "state_dict['config']"
    if not isinstance(raw, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(raw).__name__}")
    defaults = _NEW_IN_2 if version == 1 else {}
    required = [n for n in _CONFIG_FIELDS if n not in _OPTIONAL and n not in defaults]
    _check_keys(raw, required, _OPTIONAL, where)
    fields: dict[str, Any] = dict(defaults)
    for name in _CONFIG_FIELDS:
        if name not in raw:
            continue
        value = raw[name]
        at = f"{where}[{name!r}]"
        if name == "lr" and isinstance(value, Mapping):
            value = schedules.from_dict(_unwrap_scalars(value, at))
        elif name in ("nonfinite", "moment_dtype"):
            value = _scalar(value, at, str)
            if name == "moment_dtype" and value == _DEFAULT_MOMENTS:
                value = None
        elif name in _FLAGS:
            value = _scalar(value, at, bool)
        elif name in _OPTIONAL:
            value = None if value is None else _scalar(value, at, int)
        else:
            value = _scalar(value, at, float)
        fields[name] = value
    return AdamConfig(**fields)


def _parse_entry(entry: Any, config: AdamConfig, where: str) -> AdamState:
    if not isinstance(entry, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(entry).__name__}")
    names = ("m", "v", "v_max") if config.amsgrad else ("m", "v")
    if not config.amsgrad and "v_max" in entry:
        raise ValueError(f"{where}: unexpected key 'v_max' with amsgrad=False")
    _check_keys(entry, (*names, *_COUNTS), (), where)
    arrays: list[np.ndarray] = []
    for name in names:
        array = entry[name]
        if type(array) is not np.ndarray or not (
            array.dtype.kind == "f" or _bfloat16.is_bfloat16(array.dtype)
        ):
            raise TypeError(
                f"{where}[{name!r}]: expected a floating-point array, got {_describe(array)}"
            )
        if arrays and (array.shape != arrays[0].shape or array.dtype != arrays[0].dtype):
            raise ValueError(
                f"{where}[{name!r}]: expected dtype {arrays[0].dtype} and shape "
                f"{arrays[0].shape} like 'm', got dtype {array.dtype} and shape {array.shape}"
            )
        arrays.append(array)
    if _bfloat16.is_bfloat16(arrays[0].dtype):
        # NumPy computes no bfloat16: such moments are a torch optimizer's, and go back to torch.
        arrays = [_bfloat16.to_torch(array, f"{where}['m']") for array in arrays]
    counts = {name: _scalar(entry[name], f"{where}[{name!r}]", int) for name in _COUNTS}
    for name, count in counts.items():
        if count < 0:
            raise ValueError(f"{where}[{name!r}]: expected an int >= 0, got {count}")
    v_max = arrays[2] if config.amsgrad else None
    return AdamState(m=arrays[0], v=arrays[1], v_max=v_max, **counts)


def _describe(value: Any) -> str:
    if type(value) is np.ndarray:
        return str(value.dtype)  # The dtype is what is wrong.
    return type(value).__name__


def _parse_names(raw: Any, count: int) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list | tuple):
        raise TypeError(f"state_dict['names']: expected a list of str, got {type(raw).__name__}")
    names = [_scalar(name, f"state_dict['names'][{i}]", str) for i, name in enumerate(raw)]
    if len(names) != count:
        raise ValueError(
            f"state_dict['names']: expected {count} names, one per entry of 'state', "
            f"got {len(names)}"
        )
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"state_dict['names']: expected distinct names, got {duplicate!r} twice")
    return names


# -------------------------------------------------------------------------------------------------
# Fitting parsed states to the arrays they are loaded for.


def fit_in_order(states: Sequence[AdamState], live: Sequence[Any]) -> list[AdamState]:
    """The states, each of the first ``len(live)`` in the library and on the device of the live
    moments it replaces where their dtype and shape agree (the caller refuses the others)."""
    fitted = list(states)
    for position, (state, moments) in enumerate(zip(states, live)):
        if tuple(state.m.shape) == tuple(moments.shape) and _name(state.m.dtype) == _name(
            moments.dtype
        ):
            fitted[position] = _like(state, moments)
    return fitted


def fit_by_name(
    config: AdamConfig, states: Sequence[AdamState], names: Sequence[str] | None, params: Any
) -> list[AdamState]:
    """The states, each checked against the array of ``params`` at the path it is stored under
    (the dtype ``config`` gives its moments) and put in that array's library and device.

    Names and shapes that do not match are left for the caller to refuse.

    Raises:
      ValueError: a state's moments are not of the dtype its array's moments have.
    """
    if names is None:
        return list(states)
    leaves, treedef = _tree.flatten(params, "params")
    by_path = dict(zip(_tree.leaf_paths(treedef, "params"), leaves))
    fitted = list(states)
    for position, (name, state) in enumerate(zip(names, states)):
        p = by_path.get(name)
        if p is None or tuple(p.shape) != tuple(state.m.shape):
            continue
        expected = _moments_name(config, _name(p.dtype))
        if _name(state.m.dtype) != expected:
            raise ValueError(
                f"{name}: expected moments of dtype {expected} for {_name(p.dtype)} parameters "
                f"with moment_dtype={config.moment_dtype!r}, got dtype {_name(state.m.dtype)} in "
                f"state_dict['state'][{position}]"
            )
        fitted[position] = _like(state, p)
    return fitted


def _name(dtype: Any) -> str:
    """A dtype's name, the same for NumPy's and another library's (``torch.float32``)."""
    return str(dtype).rpartition(".")[2]


def _moments_name(config: AdamConfig, params: str) -> str:
    if isinstance(config.moment_dtype, np.dtype):
        return str(config.moment_dtype.name)
    try:
        return str(config.moments_dtype(np.dtype(params)).name)
    except TypeError:  # bfloat16, which NumPy does not name: its moments keep it.
        return params


def _like(state: AdamState, target: Any) -> AdamState:
    """``state`` with its moments in the library and on the device of the array ``target``:
    torch's; NumPy's and other libraries' take the moments as they are."""
    if type(target).__module__.partition(".")[0] != "torch":
        return state
    import torch  # Imported already: target is one of its tensors.

    def moved(moments: Any) -> Any:
        if moments is None:
            return None
        if isinstance(moments, np.ndarray):
            moments = torch.from_numpy(np.array(moments, order="C"))
        return moments.to(device=target.device, copy=True)

    return attrs.evolve(state, m=moved(state.m), v=moved(state.v), v_max=moved(state.v_max))
