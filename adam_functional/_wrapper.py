"""The in-place wrapper `Adam`: the notebook's ``step(params, grads)`` on the pure core.

It keeps one moment buffer pair per stepped array, keyed like the notebook by ``id()`` of the array
but tied to the array's life by a weak reference, so a new array that happens to reuse a dead
array's ``id()`` starts fresh. Each step runs the same checks as `adam_update`, then the same
kernel, with the wrapper's own buffers and the caller's arrays as the outputs (donation).
"""

from __future__ import annotations

import bisect
import numbers
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import numpy as np

from adam_functional import _kernels, _tree, schedules
from adam_functional._records import PICKLE_VERSION, AdamConfig, AdamState, _unpickle
from adam_functional._tree import LeafPaths
from adam_functional._update import (
    as_grad,
    check_params,
    find_bad_gradient,
    may_skip,
    nonfinite_error,
)

__all__ = ["Adam"]

#: The ``format`` entry of a state dict, and the versions of it this release reads.
STATE_DICT_FORMAT = "adam_functional.Adam"
STATE_DICT_VERSION = 1


#: The integer counters of a state, as in `AdamState`.
_COUNTS = ("t", "skipped", "consecutive_skips")


class _Slot:
    """The state of one array: buffers the wrapper owns and writes in place, and its counters."""

    __slots__ = (*_COUNTS, "m", "rank", "ref", "restored", "v", "v_max")

    def __init__(
        self,
        m: np.ndarray,
        v: np.ndarray,
        v_max: np.ndarray | None,
        t: int = 0,
        skipped: int = 0,
        consecutive_skips: int = 0,
    ) -> None:
        self.m = m
        self.v = v
        self.v_max = v_max
        self.t = t
        self.skipped = skipped
        self.consecutive_skips = consecutive_skips
        self.ref: weakref.ref[np.ndarray] | None = None
        # A slot restored from a checkpoint whose array is gone waits for the next new array
        # (see Adam.load_state_dict) instead of being dropped, in its place (rank) in the
        # checkpoint's first-step order.
        self.restored = False
        self.rank = 0

    @classmethod
    def zeros_like(cls, p: np.ndarray, amsgrad: bool) -> _Slot:
        return cls(
            np.zeros(p.shape, p.dtype),
            np.zeros(p.shape, p.dtype),
            np.zeros(p.shape, p.dtype) if amsgrad else None,
        )

    def fits(self, p: np.ndarray) -> bool:
        return self.m.shape == p.shape and self.m.dtype == p.dtype

    def buffers(self) -> tuple[np.ndarray, ...]:
        return (self.m, self.v) if self.v_max is None else (self.m, self.v, self.v_max)

    def fields(self) -> dict[str, Any]:
        """The state as a dict of `AdamState`'s fields (the arrays themselves, not copies)."""
        return {"m": self.m, "v": self.v, "v_max": self.v_max, **self.counts()}

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNTS}


class _StateView(Mapping[int, Any]):
    """A read-only mapping from ``id(array)`` to one field of that array's state."""

    __slots__ = ("_field", "_slots")

    def __init__(self, slots: dict[int, _Slot], field: str) -> None:
        self._slots = slots
        self._field = field

    def __getitem__(self, key: int) -> Any:
        value = getattr(self._slots[key], self._field)
        if isinstance(value, np.ndarray):
            # A read-only copy: a view of the optimizer's buffer could be made writeable again.
            value = value.copy()
            value.flags.writeable = False
        return value

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        return f"<Adam.{self._field}: {len(self)} array{'' if len(self) == 1 else 's'}>"


def _config_property(name: str, settable: bool) -> property:
    def get(self: Adam) -> Any:
        return getattr(self._config, name)

    def set_(self: Adam, value: Any) -> None:
        self._config = attrs.evolve(self._config, **{name: value})

    doc = f"``AdamConfig.{name}`` of this optimizer{'; assigning changes later steps' * settable}."
    return property(get, set_ if settable else None, doc=doc)


class Adam:
    """Adam that updates NumPy arrays in place, as the notebook's class does, on the pure core.

    ``step(params, grads)`` takes one array or a tree of arrays and writes the new values into
    them. The moments live in the optimizer, one set per array, created at the array's first step.
    ``m``, ``v`` and ``t`` are read-only mappings keyed by ``id()`` of each stepped array, as the
    notebook's dicts were, so code written against the notebook keeps working.

    Unlike the notebook's class, a step that raises changes nothing (every check runs first, for
    every leaf of a tree); a non-finite gradient raises by default; and a new array never inherits
    the state of a freed array whose ``id()`` it reuses, since the state of an array lives exactly
    as long as the array.

    Args:
      lr: learning rate, or a schedule (see `AdamConfig`).
      beta1: decay rate of the first moment.
      beta2: decay rate of the second moment.
      eps: added to the denominator.
      weight_decay: L2 penalty (or AdamW's decay with ``decoupled_weight_decay=True``).
      **options: any other `AdamConfig` field: ``decoupled_weight_decay``, ``amsgrad``,
        ``maximize``, ``nonfinite``.

    Raises:
      ValueError, TypeError: as `AdamConfig` for invalid hyperparameters.

    Examples:
      >>> import numpy as np
      >>> W = np.array([1.0, -2.0])
      >>> opt = Adam(lr=0.1)
      >>> opt.step(W, np.array([0.5, -0.5]))
      >>> W, opt.t[id(W)]
      (array([ 0.9, -1.9]), 1)
    """

    lr = _config_property("lr", settable=True)
    beta1 = _config_property("beta1", settable=True)
    beta2 = _config_property("beta2", settable=True)
    eps = _config_property("eps", settable=True)
    weight_decay = _config_property("weight_decay", settable=True)
    decoupled_weight_decay = _config_property("decoupled_weight_decay", settable=False)
    amsgrad = _config_property("amsgrad", settable=False)
    maximize = _config_property("maximize", settable=False)
    nonfinite = _config_property("nonfinite", settable=False)

    def __init__(
        self,
        lr: Any = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        self._config = AdamConfig(lr, beta1, beta2, eps, weight_decay, **options)
        self._slots: dict[int, _Slot] = {}
        self._pending: list[_Slot] = []
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: AdamConfig) -> Adam:
        """Returns an optimizer with the hyperparameters of ``config``."""
        if not isinstance(config, AdamConfig):
            raise TypeError(f"config: expected an AdamConfig, got {type(config).__name__}")
        return cls(**attrs.asdict(config, recurse=False))

    @property
    def config(self) -> AdamConfig:
        """The hyperparameters, an immutable `AdamConfig`."""
        return self._config

    @property
    def m(self) -> Mapping[int, np.ndarray]:
        """First moments by ``id()`` of each stepped array (read-only copies)."""
        return _StateView(self._slots, "m")

    @property
    def v(self) -> Mapping[int, np.ndarray]:
        """Second raw moments by ``id()`` of each stepped array (read-only copies)."""
        return _StateView(self._slots, "v")

    @property
    def t(self) -> Mapping[int, int]:
        """Steps taken by ``id()`` of each stepped array (Python ints)."""
        return _StateView(self._slots, "t")

    def __repr__(self) -> str:
        # The hyperparameters that differ from the defaults, then how many arrays it holds.
        parts = [
            f"{field.name}={getattr(self._config, field.name)!r}"
            for field in attrs.fields(AdamConfig)
            if getattr(self._config, field.name) != field.default
        ]
        parts.append(f"arrays={len(self._slots)}")
        if self._pending:
            parts.append(f"pending={len(self._pending)}")
        return f"Adam({', '.join(parts)})"

    # -----------------------------------------------------------------------------------------
    # Stepping.

    def step(self, params: Any, grads: Any) -> None:
        """Takes one Adam step, writing the new values into ``params``.

        Every check runs before anything is written: whatever is raised, no array and no state
        has changed.

        Args:
          params: a writeable floating-point NumPy array, or a tree (nested dicts, lists, tuples,
            namedtuples) of them. Every leaf is updated in place; each has its own state.
          grads: gradients with the structure of ``params`` and exactly the shape of each leaf.

        Raises:
          TypeError: a leaf cannot be written in place (a read-only array, a Python float, ...)
            or is not floating point, or a gradient holds no real numbers.
          ValueError: shapes or structures differ, the same array appears twice, or a restored
            state does not fit the array that claims it.
          FloatingPointError: a gradient is not finite and ``nonfinite="raise"``.
        """
        p_leaves, treedef = _tree.flatten(params, "params", leaf="a writeable NumPy array")
        paths = LeafPaths(treedef, "params")
        check_params(p_leaves, paths)
        for index, p in enumerate(p_leaves):
            if not p.flags.writeable:
                raise TypeError(
                    f"{paths[index]}: expected a writeable array to update in place, "
                    "got a read-only array"
                )
        owners = _owners(p_leaves, paths)
        g_leaves = _tree.flatten_like(grads, treedef, "grads")
        g_paths = LeafPaths(treedef, "grads")
        grads_arrays = [
            as_grad(g, p, g_paths, i) for i, (g, p) in enumerate(zip(g_leaves, p_leaves))
        ]
        for index, g in enumerate(grads_arrays):
            for other in owners.get(_owner(g), ()):
                if np.may_share_memory(g, p_leaves[other]):
                    # The kernel writes the parameters leaf by leaf and block by block; a
                    # gradient sharing their memory would be read after it was overwritten.
                    grads_arrays[index] = np.array(g, copy=True)
                    break
        config = self._config
        bad = None if config.nonfinite == "propagate" else find_bad_gradient(grads_arrays, p_leaves)
        # One step at a time per optimizer: steps from several threads must not claim the same
        # restored state, nor register the same array twice.
        with self._lock:
            slots, fresh = self._slots_for(p_leaves, paths)
            if bad is not None:
                index, problem = bad
                streak = max(slot.consecutive_skips for slot in slots) + 1
                if not may_skip(config, streak):
                    raise nonfinite_error(problem, g_paths[index], config, streak)
                for slot in slots:
                    slot.skipped += 1
                    slot.consecutive_skips += 1
                self._register(p_leaves, slots, fresh)
                return

            # Schedules and the environment are read (and may raise) before anything is written.
            by_t: dict[int, _kernels.Coefficients] = {}
            for slot in slots:
                if slot.t + 1 not in by_t:
                    by_t[slot.t + 1] = _kernels.coefficients(config, slot.t + 1)
            kernel = _kernels.prepare()
            # The checks have run: whatever the arithmetic meets now (an underflow, or the NaN it
            # was asked to propagate) must not interrupt the step half-way, warning or not.
            with np.errstate(all="ignore"):
                for p, g, slot in zip(p_leaves, grads_arrays, slots):
                    m, v, v_max = slot.m, slot.v, slot.v_max
                    kernel(p, g, m, v, v_max, by_t[slot.t + 1], p, m, v, v_max)
            for slot in slots:
                slot.t += 1
                slot.consecutive_skips = 0
            self._register(p_leaves, slots, fresh)

    def _live_slot(self, p: np.ndarray) -> _Slot | None:
        slot = self._slots.get(id(p))
        if slot is not None and slot.ref is not None and slot.ref() is p:
            return slot
        return None

    def _slots_for(self, leaves: list[np.ndarray], paths: LeafPaths) -> tuple[list[_Slot], int]:
        """Finds or makes each leaf's slot without registering the new ones yet.

        Returns the slots and how many pending (restored) slots the new leaves claim.
        """
        amsgrad = self._config.amsgrad
        slots = []
        claimed = 0
        for index, p in enumerate(leaves):
            slot = self._live_slot(p)
            if slot is None:
                if claimed < len(self._pending):
                    slot = self._pending[claimed]
                    claimed += 1
                    if not slot.fits(p):
                        raise ValueError(
                            f"{paths[index]}: expected dtype {slot.m.dtype} and shape "
                            f"{slot.m.shape} for the restored state it takes (states are matched "
                            f"to arrays in the order they were first stepped), got dtype "
                            f"{p.dtype} and shape {p.shape}"
                        )
                else:
                    slot = _Slot.zeros_like(p, amsgrad)
            elif not slot.fits(p):
                raise ValueError(
                    f"{paths[index]}: expected dtype {slot.m.dtype} and shape {slot.m.shape} as "
                    f"at its first step, got dtype {p.dtype} and shape {p.shape}"
                )
            slots.append(slot)
        return slots, claimed

    def _register(self, leaves: list[np.ndarray], slots: list[_Slot], claimed: int) -> None:
        del self._pending[:claimed]
        for p, slot in zip(leaves, slots):
            # A restored state that an array has claimed is that array's for good.
            slot.restored = False
            if slot.ref is None or slot.ref() is not p:
                self._bind(p, slot)

    def _bind(self, p: np.ndarray, slot: _Slot) -> None:
        owner = weakref.ref(self)
        key = id(p)

        def forget(_: weakref.ref[np.ndarray]) -> None:
            adam = owner()
            if adam is not None and adam._slots.get(key) is slot:
                del adam._slots[key]
                if slot.restored:
                    slot.ref = None
                    bisect.insort(adam._pending, slot, key=lambda pending: pending.rank)

        slot.ref = weakref.ref(p, forget)
        self._slots[key] = slot

    # -----------------------------------------------------------------------------------------
    # Snapshots, state dicts and pickling.

    def get_state(self, array: np.ndarray) -> AdamState:
        """Returns a snapshot of the state of ``array`` as an immutable `AdamState`.

        Raises:
          KeyError: ``array`` has not been stepped by this optimizer.
        """
        slot = self._live_slot(array)
        if slot is None:
            raise KeyError(f"array: not stepped by this optimizer (id {id(array)})")
        return AdamState(**slot.fields())

    def state_dict(self) -> dict[str, Any]:
        """Returns the optimizer's state as plain data: dicts, lists, arrays and Python scalars.

        The result holds no class of this package, so it can be stored without pickle (for
        example flattened into ``np.savez(..., allow_pickle=False)``). ``"state"`` lists one entry
        per array, in the order the arrays were first stepped, followed by restored states that no
        array has claimed yet. Arrays are copies.

        Raises:
          TypeError: the learning rate is a custom callable, which is not plain data.
        """
        lr = self._config.lr
        # A field left at None is left out (np.savez cannot store None); loading restores it.
        config = {
            k: v for k, v in attrs.asdict(self._config, recurse=False).items() if v is not None
        }
        if not isinstance(lr, float):
            try:
                config["lr"] = schedules.to_dict(lr)
            except TypeError as error:
                raise TypeError(
                    f"Adam.state_dict: the learning rate {lr!r} cannot be stored as plain data "
                    "(only numbers and the schedules of adam_functional.schedules can); pickle "
                    "the optimizer instead"
                ) from error
        entries = []
        for slot in [*self._slots.values(), *self._pending]:
            entry: dict[str, Any] = {
                name: value.copy() if isinstance(value, np.ndarray) else value
                for name, value in slot.fields().items()
                if value is not None
            }
            entries.append(entry)
        return {
            "format": STATE_DICT_FORMAT,
            "version": STATE_DICT_VERSION,
            "config": config,
            "state": entries,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replaces the hyperparameters and states with those of ``state_dict``.

        States are matched to arrays in the order the arrays were first stepped: the arrays this
        optimizer has already stepped take the first entries, in their first-step order, and the
        remaining entries wait for the next new arrays to be stepped, in that order. An array
        stepped in the same order as when the state dict was made therefore gets its own state
        back. Scalars may also come as 0-d arrays, as after a round trip through ``np.savez``.
        Nothing changes unless the whole dict loads.

        Raises:
          ValueError: the dict is malformed, from a newer release, has fewer entries than this
            optimizer has stepped arrays, or an entry's shape or dtype does not fit its array.
          TypeError: an entry holds the wrong kind of value.
        """
        config, slots = _parse_state_dict(state_dict)
        with self._lock:
            self._load(config, slots)

    def _load(self, config: AdamConfig, slots: list[_Slot]) -> None:
        live = list(self._slots.items())
        if len(slots) < len(live):
            raise ValueError(
                f"state_dict['state']: expected at least {len(live)} entries, one per array this "
                f"optimizer has stepped, got {len(slots)}"
            )
        for position, ((_, old), new) in enumerate(zip(live, slots)):
            if not (new.m.shape == old.m.shape and new.m.dtype == old.m.dtype):
                raise ValueError(
                    f"state_dict['state'][{position}]['m']: expected dtype {old.m.dtype} and "
                    f"shape {old.m.shape} like the array stepped {_ordinal(position)}, got dtype "
                    f"{new.m.dtype} and shape {new.m.shape}"
                )
        self._config = config
        for (_, old), new in zip(live, slots):
            for name, value in new.fields().items():
                setattr(old, name, value)
        self._pending = slots[len(live) :]

    def __reduce__(self) -> tuple[Any, ...]:
        # Each slot with its array (None for one waiting to be claimed), in first-step order.
        slots = [
            {"array": slot.ref() if slot.ref is not None else None, **slot.fields()}
            for slot in [*self._slots.values(), *self._pending]
        ]
        return (_unpickle, (Adam, PICKLE_VERSION, {"config": self._config, "slots": slots}))

    @classmethod
    def _from_pickle(cls, fields: dict[str, Any]) -> Adam:
        adam = cls.from_config(fields["config"])
        for rank, entry in enumerate(fields["slots"]):
            entry = dict(entry)
            array = entry.pop("array")
            slot = _Slot(**entry)
            slot.restored = True
            slot.rank = rank
            if array is None:
                adam._pending.append(slot)
            else:
                # Pickled together with its array: bound by identity. Should the array not
                # outlive the unpickling, the state waits for the next new array instead.
                adam._bind(array, slot)
        return adam


def _owner(array: np.ndarray) -> int:
    """The id of the object that owns ``array``'s memory: arrays of two owners never overlap."""
    owner: Any = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return id(owner)


def _owners(leaves: list[np.ndarray], paths: LeafPaths) -> dict[int, list[int]]:
    """Groups the leaves by the owner of their memory, refusing leaves that overlap.

    Raises:
      ValueError: a leaf is the same array as another, or shares memory with one: a step would
        update that memory twice.
    """
    owners: dict[int, list[int]] = {}
    for index, leaf in enumerate(leaves):
        group = owners.setdefault(_owner(leaf), [])
        for other in group:
            if leaves[other] is leaf:
                raise ValueError(
                    f"{paths[index]}: expected each array once, got the same array as "
                    f"{paths[other]}"
                )
            if np.may_share_memory(leaf, leaves[other]) and _shares(leaf, leaves[other]):
                raise ValueError(
                    f"{paths[index]}: expected arrays that share no memory, got one that "
                    f"overlaps {paths[other]}"
                )
        group.append(index)
    return owners


def _shares(a: np.ndarray, b: np.ndarray) -> bool:
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:  # Too intricate to tell: treat as overlapping.
        return True


def _ordinal(position: int) -> str:
    return {0: "first", 1: "second", 2: "third"}.get(position, f"#{position + 1}")


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
        raise TypeError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return kind(value)


_FLAGS = ("decoupled_weight_decay", "amsgrad", "maximize")
_OPTIONAL_INTS = ("max_consecutive_skips",)


def _unwrap_scalars(value: Any) -> Any:
    """Turns the 0-d arrays that ``np.savez`` gives back into Python scalars, recursively."""
    if isinstance(value, Mapping):
        return {key: _unwrap_scalars(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_unwrap_scalars(item) for item in value]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _parse_state_dict(state_dict: Mapping[str, Any]) -> tuple[AdamConfig, list[_Slot]]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
    for key in ("format", "version", "config", "state"):
        if key not in state_dict:
            raise ValueError(f"state_dict: expected the key {key!r}, got keys {list(state_dict)}")
    fmt = _scalar(state_dict["format"], "state_dict['format']", str)
    if fmt != STATE_DICT_FORMAT:
        raise ValueError(f"state_dict['format']: expected {STATE_DICT_FORMAT!r}, got {fmt!r}")
    version = _scalar(state_dict["version"], "state_dict['version']", int)
    if not 1 <= version <= STATE_DICT_VERSION:
        raise ValueError(
            f"state_dict['version']: expected 1 to {STATE_DICT_VERSION}, got {version}; a newer "
            "adam_functional wrote it"
        )
    raw_config = state_dict["config"]
    if not isinstance(raw_config, Mapping):
        raise TypeError(f"state_dict['config']: expected a dict, got {type(raw_config).__name__}")
    fields: dict[str, Any] = {}
    for field in attrs.fields(AdamConfig):
        if field.name not in raw_config:
            if field.name in _OPTIONAL_INTS:
                fields[field.name] = None
                continue
            raise ValueError(f"state_dict['config']: expected the key {field.name!r}")
        value = raw_config[field.name]
        where = f"state_dict['config'][{field.name!r}]"
        if field.name == "lr" and isinstance(value, Mapping):
            value = schedules.from_dict(_unwrap_scalars(value))
        elif field.name == "nonfinite":
            value = _scalar(value, where, str)
        elif field.name in _FLAGS:
            value = _scalar(value, where, bool)
        elif field.name in _OPTIONAL_INTS:
            value = None if value is None else _scalar(value, where, int)
        else:
            value = _scalar(value, where, float)
        fields[field.name] = value
    config = AdamConfig(**fields)

    entries = state_dict["state"]
    if not isinstance(entries, list | tuple):
        raise TypeError(f"state_dict['state']: expected a list, got {type(entries).__name__}")
    slots = []
    for position, entry in enumerate(entries):
        where = f"state_dict['state'][{position}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(entry).__name__}")
        names = ("m", "v", "v_max") if config.amsgrad else ("m", "v")
        for name in (*names, *_COUNTS):
            if name not in entry:
                raise ValueError(f"{where}: expected the key {name!r}, got keys {list(entry)}")
        if not config.amsgrad and "v_max" in entry:
            raise ValueError(f"{where}: unexpected key 'v_max' with amsgrad=False")
        arrays: list[np.ndarray] = []
        for name in names:
            array = entry[name]
            if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
                raise TypeError(
                    f"{where}[{name!r}]: expected a floating-point array, got "
                    f"{getattr(array, 'dtype', type(array).__name__)}"
                )
            if arrays and (array.shape != arrays[0].shape or array.dtype != arrays[0].dtype):
                raise ValueError(
                    f"{where}[{name!r}]: expected dtype {arrays[0].dtype} and shape "
                    f"{arrays[0].shape} like 'm', got dtype {array.dtype} and shape {array.shape}"
                )
            arrays.append(np.array(array, copy=True, order="C"))
        counts = {name: _scalar(entry[name], f"{where}[{name!r}]", int) for name in _COUNTS}
        for name, count in counts.items():
            if count < 0:
                raise ValueError(f"{where}[{name!r}]: expected an int >= 0, got {count}")
        slot = _Slot(arrays[0], arrays[1], arrays[2] if config.amsgrad else None, **counts)
        slot.restored = True
        slot.rank = position
        slots.append(slot)
    return config, slots
