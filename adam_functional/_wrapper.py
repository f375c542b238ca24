"""The in-place wrapper `Adam`: the notebook's ``step(params, grads)`` on the pure core.

It keeps one moment buffer set per stepped array, keyed like the notebook by ``id()`` of the array
but tied to the array's life by a weak reference, so a new array that happens to reuse a dead
array's ``id()`` starts fresh. A step finds each array's buffers, plans the step in place
(``adam_functional._plan``) and takes it (``adam_functional._step``), which writes the caller's
arrays and the optimizer's own buffers (donation). It adds no check and no arithmetic of its own.
"""

from __future__ import annotations

import bisect
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from adam_functional import _tree
from adam_functional import state_dict as plain_data
from adam_functional._arrays import is_foreign, library, namespace, plain, zeros
from adam_functional._plan import LeafState, build, configs_for, keep_one, kept_one
from adam_functional._records import (
    PICKLE_VERSION,
    AdamConfig,
    AdamState,
    ConfigTree,
    check_names,
    short_repr,
    unpickle,
)
from adam_functional._step import advance, take
from adam_functional._tree import ArrayTree

if TYPE_CHECKING:
    from adam_functional.schedules import Schedule

__all__ = ["Adam"]

#: The counters of a state, as in `AdamState`.
_COUNTS = ("t", "skipped", "consecutive_skips")
#: Config fields fixed at construction: they decide what a state holds.
_FIXED = frozenset({"amsgrad", "moment_dtype"})
# How many recently freed views the optimizer remembers, to notice a view made anew each step.
_FREED_VIEWS = 64


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
    def zeros_like(
        cls, p: Any, dtype: Any, amsgrad: bool, xp: Any = None, made: Any = np.zeros
    ) -> _Slot:
        """A fresh state for parameter ``p``, with moments of ``dtype``: of namespace ``xp`` for
        another library's arrays, on ``p``'s device; else ``made(shape, dtype)``, C-contiguous
        (NumPy arrays; the tensors of `_arrays.zeros`)."""

        def zeros() -> Any:
            return made(p.shape, dtype) if xp is None else xp.zeros_like(p, dtype=dtype)

        return cls(zeros(), zeros(), zeros() if amsgrad else None)

    @classmethod
    def from_state(cls, state: AdamState) -> _Slot:
        """A slot with writeable copies of a (checked) one-array state's moments, of their
        library; NumPy's C-contiguous, as the in-place kernels write them (a state may hold any
        layout, a transposed view say)."""
        foreign = is_foreign(state.m)
        xp = namespace(state.m, "state.m") if foreign else np

        def copy(x: Any) -> Any:
            return xp.asarray(x, copy=True) if foreign else np.array(x, order="C")

        v_max = None if state.v_max is None else copy(state.v_max)
        counts = {name: getattr(state, name) for name in _COUNTS}
        return cls(copy(state.m), copy(state.v), v_max, **counts)

    def leaf_state(self, origin: str | None) -> LeafState:
        return LeafState(self.m, self.v, self.v_max, self.t, self.consecutive_skips, origin)

    def snapshot(self) -> AdamState:
        """The state as an `AdamState` (copies: the caller holds the optimizer's lock)."""
        counts = {name: getattr(self, name) for name in _COUNTS}
        return AdamState(m=self.m, v=self.v, v_max=self.v_max, **counts)


class _StateView(Mapping[int, Any]):
    """A read-only mapping from ``id(array)`` to one field of that array's state."""

    __slots__ = ("_field", "_lock", "_slots")

    def __init__(self, slots: dict[int, _Slot], field: str, lock: threading.RLock) -> None:
        self._slots = slots
        self._field = field
        self._lock = lock

    def __getitem__(self, key: int) -> Any:
        with self._lock:
            value = getattr(self._slots[key], self._field)
            if is_foreign(value):
                return namespace(value, "Adam").asarray(value, copy=True)
            if isinstance(value, np.ndarray):
                # A read-only copy: a view of the optimizer's buffer could be made writeable.
                value = value.copy()
                value.flags.writeable = False
        return value

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        return f"<Adam.{self._field}: {len(self)} array{'' if len(self) == 1 else 's'}>"


def _config_property(name: str) -> property:
    def get(self: Adam) -> Any:
        return getattr(self._config, name)

    def set_(self: Adam, value: Any) -> None:
        if name in _FIXED:
            raise AttributeError(
                f"Adam.{name}: fixed at construction, since it decides what a state holds; "
                f"make a new optimizer, Adam({name}=...)"
            )
        with self._lock:
            self._config = attrs.evolve(self._config, **{name: value})

    fixed = name in _FIXED
    doc = f"``AdamConfig.{name}`` of this optimizer; {'fixed' if fixed else 'assigning changes'}"
    return property(get, set_, doc=f"{doc} {'at construction' if fixed else 'later steps'}.")


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

    Every field of `AdamConfig` is also an attribute (``opt.lr``, ``opt.max_consecutive_skips``,
    ...); assigning one changes the later steps, except ``amsgrad``, fixed at construction.

    Args:
      lr: learning rate, or a schedule (see `AdamConfig`).
      beta1: decay rate of the first moment.
      beta2: decay rate of the second moment.
      eps: added to the denominator.
      weight_decay: L2 penalty (or AdamW's decay with ``decoupled_weight_decay=True``).
      **options: any other `AdamConfig` field: ``decoupled_weight_decay``, ``amsgrad``,
        ``maximize``, ``nonfinite``, ``max_consecutive_skips``.

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

    if TYPE_CHECKING:  # The config's fields, made properties below.

        def __getattr__(self, name: str) -> Any: ...

    def __init__(
        self,
        lr: float | Schedule = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        check_names("Adam", options)
        if isinstance(lr, list | tuple | dict) or (isinstance(lr, np.ndarray) and lr.ndim > 0):
            raise TypeError(
                f"Adam: expected the learning rate as the first argument, got "
                f"{type(lr).__name__} {short_repr(lr)}; the arrays (torch's params or param "
                "groups) go to step(params, grads), and options for some arrays to "
                "step(params, grads, config=a tree of AdamConfigs)"
            )
        self._config = AdamConfig(lr, beta1, beta2, eps, weight_decay, **options)
        self._slots: dict[int, _Slot] = {}
        self._pending: list[_Slot] = []
        self._lock = threading.RLock()
        self._freed_views: dict[tuple[int, ...], None] = {}
        self._warned = False

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
        return _StateView(self._slots, "m", self._lock)

    @property
    def v(self) -> Mapping[int, np.ndarray]:
        """Second raw moments by ``id()`` of each stepped array (read-only copies)."""
        return _StateView(self._slots, "v", self._lock)

    @property
    def t(self) -> Mapping[int, int]:
        """Steps taken by ``id()`` of each stepped array (Python ints)."""
        return _StateView(self._slots, "t", self._lock)

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

    def step(
        self, params: ArrayTree, grads: ArrayTree, config: AdamConfig | ConfigTree | None = None
    ) -> None:
        """Takes one Adam step, writing the new values into ``params``.

        Every check runs before anything is written: whatever is raised, no array and no state
        has changed.

        Args:
          params: a writeable floating-point NumPy array, or a tree (nested dicts, lists, tuples,
            namedtuples) of them. Every leaf is updated in place; each has its own state, tied to
            the array object: step the same arrays every time (a view made anew at each step,
            such as ``W[:2]`` or ``W.T``, starts from zero moments each time, and a
            ``RuntimeWarning`` says so).
          grads: gradients with the structure of ``params`` and exactly the shape of each leaf.
          config: this step's hyperparameters for some arrays: an `AdamConfig`, or a tree of them
            that is a prefix of ``params`` (as in `adam_update`), e.g. ``{"w": decayed, "b":
            plain}`` to keep weight decay off the biases; the optimizer's own `config` where it
            is None. An array's AMSGrad and moment dtype are fixed at its first step.

        Raises:
          TypeError: a leaf cannot be written in place (a read-only array, a Python float, ...)
            or is not floating point, or a gradient holds no real numbers.
          ValueError: shapes or structures differ, the same array appears twice or arrays share
            memory, or a restored state does not fit the array that claims it.
          FloatingPointError: a gradient is not finite and ``nonfinite="raise"``.
        """
        if type(params) is np.ndarray and config is None and self._step_one(params, grads):
            return
        leaves, treedef = _tree.flatten(params, "params", leaf="a writeable NumPy array")
        configs = configs_for(self._config if config is None else config, treedef)
        if config is not None:
            self._check_fixed(configs, treedef)
        # One step at a time per optimizer: steps from several threads must not claim the same
        # restored state, nor register the same array twice, and snapshots see whole steps.
        with self._lock:
            slots, claimed = self._slots_for(leaves)
            states = [
                None if slot is None else slot.leaf_state(origin)
                for slot, origin in zip(slots, self._origins(slots, claimed))
            ]
            g_leaves = _tree.flatten_like(grads, treedef, "grads")
            checked = build(leaves, treedef, g_leaves, states, configs, in_place=True)
            plan = checked.plan
            # New arrays' moments: of their library; CPU tensors' are tensors, viewed to step.
            made: Any = np.zeros if checked.tensors is None else zeros
            owned = [
                _Slot.zeros_like(p, dtype, c.amsgrad, plan.xp, made) if slot is None else slot
                for p, dtype, c, slot in zip(checked.params, plan.moments, configs, slots)
            ]
            filled: list[LeafState | None] = [
                state if state is not None else slot.leaf_state(None)
                for state, slot in zip(checked.states, owned)
            ]
            checked = checked._replace(states=filled)
            stepped = take(checked)
            for index, slot in enumerate(owned):
                if plan.xp is not None and stepped.new is not None:  # New arrays of the library.
                    slot.m, slot.v, slot.v_max = stepped.new[index][1:]
                slot.t, slot.skipped, slot.consecutive_skips = advance(
                    slot.t, slot.skipped, slot.consecutive_skips, stepped.taken
                )
            self._register(leaves, owned, claimed)
            if treedef is None and config is None:
                keep_one(checked, filled[0], configs[0])

    def _step_one(self, p: np.ndarray, g: Any) -> bool:
        """`step` of one array already stepped, on the plan kept for it where that still fits
        (`kept_one`); False when it does not, and nothing was done."""
        with self._lock:
            slot = self._live_slot(p)
            if slot is None:
                return False
            state = LeafState(slot.m, slot.v, slot.v_max, slot.t, slot.consecutive_skips, None)
            checked = kept_one(p, g, state, self._config, True)
            if checked is None:
                return False
            stepped = take(checked)
            slot.t, slot.skipped, slot.consecutive_skips = advance(
                slot.t, slot.skipped, slot.consecutive_skips, stepped.taken
            )
            # A restored state that its array has stepped is that array's for good.
            slot.restored = False
            return True

    def _check_fixed(self, configs: list[AdamConfig], treedef: Any) -> None:
        """Refuses a step config that changes what this optimizer's states hold."""
        for index, config in enumerate(configs):
            for name in sorted(_FIXED):
                ours, theirs = getattr(self._config, name), getattr(config, name)
                if ours != theirs:
                    path = _tree.LeafPaths(treedef, "config")[index]
                    raise ValueError(
                        f"{path}: expected {name}={ours!r} like the optimizer, got {theirs!r}; "
                        f"{name} decides what a state holds and is fixed at construction: "
                        f"Adam({name}=...)"
                    )

    def _live_slot(self, p: Any) -> _Slot | None:
        slot = self._slots.get(id(p))
        if slot is not None and slot.ref is not None and slot.ref() is p:
            return slot
        return None

    def _slots_for(self, leaves: list[np.ndarray]) -> tuple[list[_Slot | None], int]:
        """Each leaf's slot: its own, else the next restored one waiting, else None (new).

        Returns the slots and how many waiting (restored) slots the new leaves claim.
        """
        slots: list[_Slot | None] = []
        claimed = 0
        for p in leaves:
            slot = self._live_slot(p)
            if slot is None and claimed < len(self._pending):
                slot = self._pending[claimed]
                claimed += 1
            slots.append(slot)
        return slots, claimed

    def _origins(self, slots: list[_Slot | None], claimed: int) -> Iterator[str]:
        """Where each slot's moments come from, for the error when they do not fit."""
        if not claimed:
            yield from ["as at its first step"] * len(slots)
            return
        pending = self._pending[:claimed]
        for slot in slots:
            if any(slot is other for other in pending):
                yield (
                    "for the restored state it takes (states are matched to arrays in the order "
                    "they were first stepped)"
                )
            else:
                yield "as at its first step"

    def _register(self, leaves: list[np.ndarray], slots: list[_Slot], claimed: int) -> None:
        del self._pending[:claimed]
        for p, slot in zip(leaves, slots):
            # A restored state that an array has claimed is that array's for good.
            slot.restored = False
            if slot.ref is None or slot.ref() is not p:
                if slot.t + slot.skipped <= 1:
                    self._notice_new_view(p)
                self._bind(p, slot)

    def _bind(self, p: np.ndarray, slot: _Slot) -> None:
        owner = weakref.ref(self)
        key = id(p)
        view = _view_key(p)

        def forget(_: weakref.ref[np.ndarray]) -> None:
            adam = owner()
            if adam is not None and adam._slots.get(key) is slot:
                del adam._slots[key]
                if view is not None:
                    adam._freed_views[view] = None
                    if len(adam._freed_views) > _FREED_VIEWS:
                        del adam._freed_views[next(iter(adam._freed_views))]
                if slot.restored:
                    slot.ref = None
                    bisect.insort(adam._pending, slot, key=lambda pending: pending.rank)

        slot.ref = weakref.ref(p, forget)
        self._slots[key] = slot

    def _notice_new_view(self, p: np.ndarray) -> None:
        view = _view_key(p)
        if view is None or view not in self._freed_views or self._warned:
            return
        self._warned = True
        warnings.warn(
            "Adam.step: params is a new view of memory whose earlier view was stepped and then "
            "freed (a view made at each step, such as W[:2] or W.T): its moments start from "
            "zero at every step. Keep the view in a variable and step that, or step the array "
            "itself.",
            RuntimeWarning,
            stacklevel=4,
        )

    # -----------------------------------------------------------------------------------------
    # Snapshots, state dicts and pickling. Each takes the lock, so it sees whole steps.

    def get_state(self, array: np.ndarray) -> AdamState:
        """Returns a snapshot of the state of ``array`` as an immutable `AdamState`.

        Raises:
          KeyError: ``array`` has not been stepped by this optimizer.
        """
        with self._lock:
            slot = self._live_slot(array)
            if slot is None:
                raise KeyError(f"array: not stepped by this optimizer (id {id(array)})")
            return slot.snapshot()

    def state_dict(self, params: Any = None) -> dict[str, Any]:
        """Returns the optimizer's state as plain data: dicts, lists, arrays and Python scalars.

        The result holds no class of this package, so it can be stored without pickle (see
        `adam_functional.state_dict` for its layout, and `adam_functional.checkpoint`).

        With ``params``, a tree of arrays this optimizer has stepped (the one given to `step`),
        the state dict holds their states under their tree paths (``"params['w']"``), and
        ``load_state_dict(state_dict, params)`` gives each array back its own state by name:
        the way to restore. Without it, ``"state"`` lists one entry per array in the order the
        arrays were first stepped, followed by restored states that no array has claimed yet,
        and loading matches them by that order. Arrays are copies.

        Raises:
          TypeError: the learning rate is a custom callable, which is not plain data.
          KeyError: an array of ``params`` has not been stepped by this optimizer.
        """
        with self._lock:
            if params is None:
                slots = [*self._slots.values(), *self._pending]
                return plain_data.build(self._config, [s.snapshot() for s in slots])
            leaves, treedef = _tree.flatten(params, "params")
            paths = _tree.leaf_paths(treedef, "params")
            states = []
            for path, p in zip(paths, leaves):
                slot = self._live_slot(p)
                if slot is None:
                    raise KeyError(f"{path}: not stepped by this optimizer")
                states.append(slot.snapshot())
            return plain_data.build(self._config, states, names=paths)

    def load_state_dict(self, state_dict: Mapping[str, Any], params: Any = None) -> None:
        """Replaces the hyperparameters and states with those of ``state_dict``.

        With ``params`` (a tree of arrays, as given to `state_dict`), each array gets the state
        stored under its tree path, whatever order the arrays are stepped in afterwards: the way
        to restore. The state dict must have been made with ``params`` of the same structure.

        Without ``params``, states are matched to arrays **by order**: the arrays this optimizer
        has already stepped take the first entries, in their first-step order, and the remaining
        entries wait for the next new arrays to be stepped, in that order. An array stepped in
        another order than when the state dict was made gets another array's state (silently, if
        their shapes agree).

        Scalars may also come as 0-d arrays, as after a round trip through ``np.savez``. Nothing
        changes unless the whole dict loads.

        Raises:
          ValueError: the dict is malformed (a missing or unknown key, a value out of range),
            from a newer release, has fewer entries than this optimizer has stepped arrays, an
            entry's shape or dtype does not fit its array, or (with ``params``) names do not
            match the tree's paths.
          TypeError: an entry holds the wrong kind of value.
        """
        config, states, names = plain_data.parse(state_dict)
        with self._lock:
            if params is None:
                states = plain_data.fit_in_order(states, [s.m for s in self._slots.values()])
            else:
                states = plain_data.fit_by_name(config, states, names, params)
            slots = [_Slot.from_state(state) for state in states]
            for rank, slot in enumerate(slots):
                slot.restored = True
                slot.rank = rank
            if params is None:
                self._load_in_order(config, slots)
            else:
                self._load_by_name(config, slots, names, params)

    def _load_in_order(self, config: AdamConfig, slots: list[_Slot]) -> None:
        live = list(self._slots.values())
        if len(slots) < len(live):
            raise ValueError(
                f"state_dict['state']: expected at least {len(live)} entries, one per array this "
                f"optimizer has stepped, got {len(slots)}"
            )
        for position, (old, new) in enumerate(zip(live, slots)):
            if not (new.m.shape == old.m.shape and new.m.dtype == old.m.dtype):
                raise ValueError(
                    f"state_dict['state'][{position}]['m']: expected dtype {old.m.dtype} and "
                    f"shape {old.m.shape} like the array stepped {_ordinal(position)}, got dtype "
                    f"{new.m.dtype} and shape {new.m.shape}"
                )
        self._config = config
        for old, new in zip(live, slots):
            for name in ("m", "v", "v_max", *_COUNTS):
                setattr(old, name, getattr(new, name))
        self._pending = slots[len(live) :]

    def _load_by_name(
        self, config: AdamConfig, slots: list[_Slot], names: list[str] | None, params: Any
    ) -> None:
        if names is None:
            raise ValueError(
                "state_dict: expected 'names' to load by the paths of params, got a state dict "
                "made without params; call load_state_dict(state_dict) to load it in order"
            )
        leaves, treedef = _tree.flatten(params, "params")
        paths = _tree.leaf_paths(treedef, "params")
        by_name = dict(zip(names, slots))
        if sorted(paths) != sorted(names):
            missing = [path for path in paths if path not in by_name]
            unknown = [name for name in names if name not in set(paths)]
            raise ValueError(
                f"state_dict['names']: expected the paths of params {paths!r}, got {names!r} "
                f"(missing {missing!r}, unexpected {unknown!r})"
            )
        for path, p in zip(paths, leaves):
            slot = by_name[path]
            if slot.m.shape != p.shape:
                raise ValueError(
                    f"{path}: expected shape {slot.m.shape} for the state stored under its name, "
                    f"got dtype {p.dtype} and shape {p.shape}"
                )
        self._config = config
        self._slots.clear()
        self._pending = []
        for path, p in zip(paths, leaves):
            by_name[path].restored = False
            self._bind(p, by_name[path])

    def __reduce__(self) -> tuple[Any, ...]:
        # Each slot with its array (None for one waiting to be claimed), in first-step order;
        # copied under the lock, so that a step in another thread cannot tear the snapshot.
        with self._lock:
            slots = []
            for slot in [*self._slots.values(), *self._pending]:
                state = slot.snapshot()
                fields = {name: getattr(state, name) for name in ("m", "v", "v_max", *_COUNTS)}
                slots.append({"array": slot.ref() if slot.ref is not None else None, **fields})
            return (unpickle, (Adam, PICKLE_VERSION, {"config": self._config, "slots": slots}))

    @classmethod
    def _from_pickle(cls, fields: dict[str, Any]) -> Adam:
        """Rebuilds an optimizer from its pickle, checking every state as `AdamState` does."""
        if not isinstance(fields, dict) or set(fields) != {"config", "slots"}:
            raise ValueError("cannot unpickle Adam: expected the fields 'config' and 'slots'")
        config, entries = fields["config"], fields["slots"]
        if not isinstance(config, AdamConfig):
            raise TypeError(f"cannot unpickle Adam: config is a {type(config).__name__}")
        if not isinstance(entries, list):
            raise TypeError(f"cannot unpickle Adam: slots is a {type(entries).__name__}")
        adam = cls.from_config(config)
        for rank, entry in enumerate(entries):
            array, slot = _unpickled_slot(entry, config, f"cannot unpickle Adam: slots[{rank}]")
            slot.restored = True
            slot.rank = rank
            if array is None:
                adam._pending.append(slot)
            else:
                # Pickled together with its array: bound by identity. Should the array not
                # outlive the unpickling, the state waits for the next new array instead.
                adam._bind(array, slot)
        return adam


for _field in attrs.fields(AdamConfig):
    setattr(Adam, _field.name, _config_property(_field.name))


def _unpickled_slot(entry: Any, config: AdamConfig, where: str) -> tuple[Any, _Slot]:
    """Checks one pickled slot as strictly as a state dict's entry; returns its array and slot."""
    names = {"array", "m", "v", "v_max", *_COUNTS}
    if not isinstance(entry, dict) or set(entry) != names:
        raise ValueError(f"{where}: expected a dict with the keys {sorted(names)}")
    try:
        state = AdamState(**{name: entry[name] for name in names - {"array"}})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    foreign = is_foreign(state.m)
    if type(state.m) is not np.ndarray and not foreign:
        raise ValueError(f"{where}: expected one array per moment, got a tree")
    if config.amsgrad != (state.v_max is not None):
        expected = "an array" if config.amsgrad else "None"
        raise ValueError(f"{where}: expected v_max {expected} with amsgrad={config.amsgrad}")
    array = entry["array"]
    if array is not None and not _fits(array, state.m, foreign):
        raise ValueError(
            f"{where}: expected its array to be a floating-point array of shape "
            f"{tuple(state.m.shape)} like its moments, got {_describe(array)}"
        )
    return array, _Slot.from_state(state)


def _fits(array: Any, m: Any, foreign: bool) -> bool:
    """Whether a pickled ``array`` can own moments ``m``: a floating-point array of their shape
    and library (a torch tensor's moments are torch tensors, say)."""
    if not foreign:
        return (
            isinstance(array, np.ndarray)
            and array.shape == m.shape
            and plain(array).dtype.kind == "f"
        )
    if not is_foreign(array) or library(array) != library(m):
        return False
    xp = namespace(array, "array")
    return tuple(array.shape) == tuple(m.shape) and bool(xp.isdtype(array.dtype, "real floating"))


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray) or is_foreign(value):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


def _view_key(p: Any) -> tuple[int, ...] | None:
    """For a view, where its memory lies and how it is laid out; None for an array of its own
    (and for other libraries' arrays)."""
    if not isinstance(p, np.ndarray) or p.base is None:
        return None
    return (p.__array_interface__["data"][0], *p.shape, *p.strides, p.dtype.num)


def _ordinal(position: int) -> str:
    return {0: "first", 1: "second", 2: "third"}.get(position, f"#{position + 1}")
