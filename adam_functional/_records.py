"""The immutable records: `AdamConfig` (hyperparameters) and `AdamState` (moments).

Both are frozen attrs classes validated at construction, so an invalid config or a state that is not
a tree of read-only floating-point arrays cannot exist. Both pickle with a format version, so that a
pickle written by a newer release is refused with a clear error instead of being misread.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import attrs
import numpy as np

from adam_functional import _tree

__all__ = ["PICKLE_VERSION", "AdamConfig", "AdamState", "NonFinitePolicy"]

#: The format version written into every pickle of this package's records. Unpickling a larger
#: version raises ``ValueError``; every smaller version keeps loading.
PICKLE_VERSION = 1

NonFinitePolicy = Literal["raise", "skip", "propagate"]
_NONFINITE_POLICIES = ("raise", "skip", "propagate")


def _unpickle(cls: type[Any], version: int, fields: dict[str, Any]) -> Any:
    """Rebuilds a record from its pickle, refusing formats newer than this release reads."""
    if not isinstance(version, int) or version > PICKLE_VERSION:
        raise ValueError(
            f"cannot unpickle {cls.__name__}: expected format version <= {PICKLE_VERSION}, got "
            f"{version!r}; it was written by a newer adam_functional, upgrade to read it"
        )
    return cls._from_pickle(fields)


# -------------------------------------------------------------------------------------------------
# Field converters: each checks one value and returns it in its canonical form (a Python float,
# int or bool), so that records hold plain values that compare, hash and pickle predictably.


def _real(value: Any, where: str, expected: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def _non_negative(name: str, expected: str = "a finite number >= 0") -> Any:
    def convert(value: Any) -> float:
        number = _real(value, f"AdamConfig.{name}", expected)
        if not (math.isfinite(number) and number >= 0.0):
            raise ValueError(f"AdamConfig.{name}: expected {expected}, got {value!r}")
        return number

    return convert


def _beta(name: str) -> Any:
    expected = "a number in [0, 1)"

    def convert(value: Any) -> float:
        number = _real(value, f"AdamConfig.{name}", expected)
        if not 0.0 <= number < 1.0:  # Also false for NaN.
            raise ValueError(f"AdamConfig.{name}: expected {expected}, got {value!r}")
        return number

    return convert


_check_lr = _non_negative("lr", "a finite number >= 0 or a schedule")


def _learning_rate(value: Any) -> Any:
    if callable(value) and not isinstance(value, numbers.Number):
        return value  # A schedule; each rate it returns is checked when a step uses it.
    return _check_lr(value)


def _flag(name: str) -> Any:
    def convert(value: Any) -> bool:
        if not isinstance(value, bool | np.bool_):
            raise TypeError(
                f"AdamConfig.{name}: expected True or False, got {type(value).__name__} {value!r}"
            )
        return bool(value)

    return convert


def _max_consecutive_skips(value: Any) -> int | None:
    if value is None:
        return None
    expected = "None or an int >= 0"
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"AdamConfig.max_consecutive_skips: expected {expected}, "
            f"got {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise ValueError(f"AdamConfig.max_consecutive_skips: expected {expected}, got {value!r}")
    return int(value)


def _nonfinite(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"AdamConfig.nonfinite: expected one of {', '.join(map(repr, _NONFINITE_POLICIES))}, "
            f"got {type(value).__name__} {value!r}"
        )
    if value not in _NONFINITE_POLICIES:
        raise ValueError(
            f"AdamConfig.nonfinite: expected one of {', '.join(map(repr, _NONFINITE_POLICIES))}, "
            f"got {value!r}"
        )
    return value


# attrs' mypy plugin reads converters by name, so each field gets a named function.
def _to_lr(value: Any) -> Any:
    return _learning_rate(value)


def _to_beta1(value: Any) -> float:
    return _beta("beta1")(value)  # type: ignore[no-any-return]


def _to_beta2(value: Any) -> float:
    return _beta("beta2")(value)  # type: ignore[no-any-return]


def _to_eps(value: Any) -> float:
    return _non_negative("eps")(value)  # type: ignore[no-any-return]


def _to_weight_decay(value: Any) -> float:
    return _non_negative("weight_decay")(value)  # type: ignore[no-any-return]


def _to_decoupled_weight_decay(value: Any) -> bool:
    return _flag("decoupled_weight_decay")(value)  # type: ignore[no-any-return]


def _to_amsgrad(value: Any) -> bool:
    return _flag("amsgrad")(value)  # type: ignore[no-any-return]


def _to_maximize(value: Any) -> bool:
    return _flag("maximize")(value)  # type: ignore[no-any-return]


@attrs.frozen
class AdamConfig:
    """The hyperparameters of Adam, validated at construction.

    The defaults are those of Kingma & Ba (2014), ``torch.optim.Adam`` and ``optax.adam``.

    Args:
      lr: the learning rate (``alpha`` in the paper, ``learning_rate`` in optax and Keras): a
        finite number >= 0, or a schedule, a callable ``t -> float`` such as those in
        `adam_functional.schedules`. Step ``t`` (1-based: the step count after the step)
        uses ``lr(t)``.
      beta1: decay rate of the first moment ``m``, in [0, 1) (torch ``betas[0]``, optax ``b1``).
      beta2: decay rate of the second moment ``v``, in [0, 1) (torch ``betas[1]``, optax ``b2``).
      eps: added to ``sqrt(v_hat)`` in the denominator, >= 0.
      weight_decay: a number >= 0. By default the notebook's L2 penalty,
        ``g + weight_decay * p``, which Adam then rescales per coordinate; with
        ``decoupled_weight_decay`` it is AdamW's decay.
      decoupled_weight_decay: decay the parameters directly, ``p * (1 - lr * weight_decay)``
        before the Adam step, as ``torch.optim.AdamW`` does (Loshchilov & Hutter).
      amsgrad: keep ``v_max = max(v_max, v)`` over the raw second moment and use it in the
        denominator, as torch and Keras do (Reddi et al.).
      maximize: ascend the objective: use ``-g`` in place of ``g``.
      nonfinite: what a step does when a gradient holds NaN or infinity: ``"raise"`` a
        ``FloatingPointError`` naming the leaf (the default), ``"skip"`` the step (parameters and
        moments unchanged, ``t`` not advanced, ``AdamState.skipped`` counts it), or
        ``"propagate"`` the values into the parameters as the plain formula does.
      max_consecutive_skips: with ``nonfinite="skip"``, the most steps in a row that may be
        skipped; the next non-finite gradient raises ``FloatingPointError`` instead, so that a run
        whose gradients stay broken stops rather than skipping forever. ``None`` (the default)
        sets no bound.

    Raises:
      ValueError: a value is out of range (a negative, infinite or NaN ``lr``, ``eps`` or
        ``weight_decay``; a beta outside [0, 1) or NaN; an unknown ``nonfinite``).
      TypeError: a value is of the wrong kind (a bool or string where a number belongs).

    Examples:
      >>> AdamConfig(lr=1e-2)
      AdamConfig(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-08, weight_decay=0.0, \
decoupled_weight_decay=False, amsgrad=False, maximize=False, nonfinite='raise', \
max_consecutive_skips=None)
      >>> AdamConfig(lr=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: AdamConfig.lr: expected a finite number >= 0 or a schedule, got -1.0
    """

    lr: Any = attrs.field(default=1e-3, converter=_to_lr)
    beta1: float = attrs.field(default=0.9, converter=_to_beta1)
    beta2: float = attrs.field(default=0.999, converter=_to_beta2)
    eps: float = attrs.field(default=1e-8, converter=_to_eps)
    weight_decay: float = attrs.field(default=0.0, converter=_to_weight_decay)
    decoupled_weight_decay: bool = attrs.field(
        default=False, kw_only=True, converter=_to_decoupled_weight_decay
    )
    amsgrad: bool = attrs.field(default=False, kw_only=True, converter=_to_amsgrad)
    maximize: bool = attrs.field(default=False, kw_only=True, converter=_to_maximize)
    nonfinite: NonFinitePolicy = attrs.field(default="raise", kw_only=True, converter=_nonfinite)
    max_consecutive_skips: int | None = attrs.field(
        default=None, kw_only=True, converter=_max_consecutive_skips
    )

    def learning_rate(self, t: int) -> float:
        """Returns the learning rate of step ``t`` (1-based), checked to be finite and >= 0.

        Raises:
          ValueError: a schedule returned a negative, infinite or NaN rate.
          TypeError: a schedule returned something that is not a real number.
        """
        if type(self.lr) is float:
            return self.lr
        value = self.lr(t)
        where = f"AdamConfig.lr({t})"
        expected = "a finite number >= 0 from the schedule"
        rate = _real(value, where, expected)
        if not (math.isfinite(rate) and rate >= 0.0):
            raise ValueError(f"{where}: expected {expected}, got {value!r}")
        return rate

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle, (AdamConfig, PICKLE_VERSION, attrs.asdict(self, recurse=False)))

    @classmethod
    def _from_pickle(cls, fields: dict[str, Any]) -> AdamConfig:
        return cls(**fields)


# -------------------------------------------------------------------------------------------------
# The state.


def _freeze(array: np.ndarray, owned: bool = False) -> np.ndarray:
    """Returns a read-only array with the values of ``array`` that nothing else can write.

    The array is copied: a read-only array the caller holds could be made writeable again by its
    owner. ``owned=True`` says the caller holds the only reference (as after unpickling), and an
    array that owns its memory is then frozen where it is.
    """
    if owned and array.base is None:
        array.flags.writeable = False
        return array
    copy = np.array(array, copy=True, order="C")
    copy.flags.writeable = False
    return copy


def _frozen_tree(tree: Any, name: str, owned: bool = False) -> Any:
    leaves, treedef = _tree.flatten(tree, f"AdamState.{name}")
    paths: list[str] | None = None
    frozen = []
    for index, leaf in enumerate(leaves):
        if leaf.dtype.kind != "f":
            paths = paths or _tree.leaf_paths(treedef, f"AdamState.{name}")
            raise TypeError(
                f"{paths[index]}: expected a floating-point array, got dtype {leaf.dtype}"
            )
        frozen.append(_freeze(leaf, owned))
    return _tree.unflatten(treedef, frozen)


def _count(name: str) -> Any:
    def convert(value: Any) -> int:
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"AdamState.{name}: expected an int >= 0, got {type(value).__name__} {value!r}"
            )
        if value < 0:
            raise ValueError(f"AdamState.{name}: expected an int >= 0, got {value!r}")
        return int(value)

    return convert


def _tree_equal(a: Any, b: Any) -> bool:
    """True when two trees have the same structure, dtypes, shapes and values (NaN equals NaN)."""
    if a is None or b is None:
        return a is b
    leaves_a, treedef = _tree.flatten(a, "a")
    try:
        # Walked along a's structure: dicts are equal whatever the order of their keys.
        leaves_b = _tree.flatten_like(b, treedef, "b")
    except ValueError:
        return False
    return all(
        isinstance(y, np.ndarray)
        and x.dtype == y.dtype
        and x.shape == y.shape
        and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(leaves_a, leaves_b)
    )


class _Spec:
    """Stands for an array in a repr: ``float64[3, 2]``."""

    __slots__ = ("text",)

    def __init__(self, array: np.ndarray) -> None:
        self.text = f"{array.dtype}[{', '.join(map(str, array.shape))}]"

    def __repr__(self) -> str:
        return self.text


def _tree_repr(tree: Any) -> str:
    if tree is None:
        return "None"
    leaves, treedef = _tree.flatten(tree, "tree")
    return repr(_tree.unflatten(treedef, [_Spec(leaf) for leaf in leaves]))


def _to_m(tree: Any) -> Any:
    return _frozen_tree(tree, "m")


def _to_v(tree: Any) -> Any:
    return _frozen_tree(tree, "v")


def _to_v_max(tree: Any) -> Any:
    return None if tree is None else _frozen_tree(tree, "v_max")


def _to_t(value: Any) -> int:
    return _count("t")(value)  # type: ignore[no-any-return]


def _to_skipped(value: Any) -> int:
    return _count("skipped")(value)  # type: ignore[no-any-return]


def _to_consecutive_skips(value: Any) -> int:
    return _count("consecutive_skips")(value)  # type: ignore[no-any-return]


_TREE_EQ = attrs.cmp_using(eq=_tree_equal)


@attrs.frozen(unsafe_hash=False, repr=False)
class AdamState:
    """The moments of Adam for one tree of parameters: immutable, with read-only arrays.

    ``m``, ``v`` (and ``v_max`` with AMSGrad) have the structure, shapes and dtypes of the
    parameters they were made for. Construction copies any array that something else could still
    write, and marks every array read-only, so a state never changes after it is made.

    Names follow Kingma & Ba's Algorithm 1. In optax's ``ScaleByAdamState`` they are ``mu``,
    ``nu`` and ``count``; in ``torch.optim.Adam``'s state, ``exp_avg``, ``exp_avg_sq`` and
    ``step`` (and ``max_exp_avg_sq`` for ``v_max``).

    Args:
      m: the first moment, an exponential moving average of the gradients.
      v: the second raw moment, an exponential moving average of the squared gradients.
      t: the number of steps taken, a Python ``int``: exact for any number of steps (torch keeps
        a float32 tensor, optax a saturating int32).
      v_max: with AMSGrad, the elementwise maximum of every ``v`` so far; else ``None``.
      skipped: how many steps ``nonfinite="skip"`` has skipped in all.
      consecutive_skips: how many of them came in a row just before now; a step taken resets it.

    Raises:
      TypeError: a leaf is not a floating-point NumPy array, or a count is not an int.
      ValueError: ``m``, ``v`` and ``v_max`` differ in structure, shape or dtype, or a count
        is negative.

    Examples:
      >>> import numpy as np
      >>> state = AdamState(m=np.zeros(3), v=np.zeros(3), t=0)
      >>> state
      AdamState(t=0, skipped=0, consecutive_skips=0, m=float64[3], v=float64[3], v_max=None)
      >>> state.m.flags.writeable
      False
    """

    m: Any = attrs.field(eq=_TREE_EQ, converter=_to_m)
    v: Any = attrs.field(eq=_TREE_EQ, converter=_to_v)
    t: int = attrs.field(converter=_to_t)
    v_max: Any = attrs.field(default=None, eq=_TREE_EQ, converter=_to_v_max)
    skipped: int = attrs.field(default=0, converter=_to_skipped)
    consecutive_skips: int = attrs.field(default=0, converter=_to_consecutive_skips)

    def __attrs_post_init__(self) -> None:
        m_leaves, m_def = _tree.flatten(self.m, "AdamState.m")
        for name in ("v", "v_max"):
            tree = getattr(self, name)
            if tree is None:
                continue
            leaves = _tree.flatten_like(tree, m_def, f"AdamState.{name}", "AdamState.m")
            paths = _tree.LeafPaths(m_def, f"AdamState.{name}")
            for index, (leaf, m_leaf) in enumerate(zip(leaves, m_leaves)):
                if leaf.shape != m_leaf.shape or leaf.dtype != m_leaf.dtype:
                    raise ValueError(
                        f"{paths[index]}: expected {m_leaf.dtype}{list(m_leaf.shape)} like "
                        f"AdamState.m, got {leaf.dtype}{list(leaf.shape)}"
                    )

    @classmethod
    def _trusted(
        cls, m: Any, v: Any, t: int, v_max: Any, skipped: int, consecutive_skips: int
    ) -> AdamState:
        """Makes a state from values the update has just made read-only, skipping the checks."""
        state = object.__new__(cls)
        object.__setattr__(state, "m", m)
        object.__setattr__(state, "v", v)
        object.__setattr__(state, "t", t)
        object.__setattr__(state, "v_max", v_max)
        object.__setattr__(state, "skipped", skipped)
        object.__setattr__(state, "consecutive_skips", consecutive_skips)
        return state

    def __repr__(self) -> str:
        return (
            f"AdamState(t={self.t}, skipped={self.skipped}, "
            f"consecutive_skips={self.consecutive_skips}, m={_tree_repr(self.m)}, "
            f"v={_tree_repr(self.v)}, v_max={_tree_repr(self.v_max)})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {field.name: getattr(self, field.name) for field in attrs.fields(AdamState)}
        return (_unpickle, (AdamState, PICKLE_VERSION, fields))

    @classmethod
    def _from_pickle(cls, fields: dict[str, Any]) -> AdamState:
        # The unpickled arrays belong to nobody else yet: freeze them where they are, no copies.
        fields = dict(fields)
        for name in ("m", "v", "v_max"):
            if fields.get(name) is not None:
                fields[name] = _frozen_tree(fields[name], name, owned=True)
        return cls(**fields)
