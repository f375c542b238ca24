"""The immutable records: `AdamConfig` (hyperparameters) and `AdamState` (moments).

Both are frozen attrs classes validated at construction, so an invalid config or a state that is not
a tree of read-only floating-point arrays cannot exist. Both pickle with a format version, so that a
pickle written by a newer release is refused with a clear error instead of being misread.
"""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import attrs
import numpy as np

from adam_functional import _tree
from adam_functional._arrays import is_foreign, library, namespace, to_numpy
from adam_functional._tree import ArrayTree

if TYPE_CHECKING:
    from adam_functional.schedules import Schedule

__all__ = [
    "PICKLE_VERSION",
    "AdamConfig",
    "AdamState",
    "ConfigTree",
    "NonFinitePolicy",
    "check_names",
    "is_sealed",
    "register_with_jax",
    "seal",
    "short_repr",
    "unpickle",
]

#: The format version written into every pickle of this package's records. Unpickling a larger
#: version raises ``ValueError``; every smaller version keeps loading.
PICKLE_VERSION = 1

NonFinitePolicy = Literal["raise", "skip", "propagate"]
#: A tree of `AdamConfig`s that is a prefix of the parameters' tree (see `adam_update`).
ConfigTree: TypeAlias = Any
_NONFINITE_POLICIES = ("raise", "skip", "propagate")


def unpickle(cls: type[Any], version: int, fields: dict[str, Any]) -> Any:
    """Rebuilds a record from its pickle, refusing formats newer than this release reads."""
    if not isinstance(version, int) or version > PICKLE_VERSION:
        raise ValueError(
            f"cannot unpickle {cls.__name__}: expected format version <= {PICKLE_VERSION}, got "
            f"{version!r}; it was written by a newer adam_functional, upgrade to read it"
        )
    return cls._from_pickle(fields)


# The name that pickles written by 0.1 refer to.
_unpickle = unpickle


# -------------------------------------------------------------------------------------------------
# Field converters: each checks one value and returns it in its canonical form (a Python float,
# int or bool), so that records hold plain values that compare, hash and pickle predictably. Each
# takes the field, to name it in its errors.


def short_repr(value: Any) -> str:
    """A repr for an error message: never a whole array or container, never pages of digits."""
    if isinstance(value, np.ndarray):
        return f"of shape {value.shape}"
    if isinstance(value, list | tuple | dict | set):
        return f"of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, int) and value.bit_length() > 200:
        return f"of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _real(value: Any, where: str, expected: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        got = f"{type(value).__name__} {short_repr(value)}"
        raise TypeError(f"{where}: expected {expected}, got {got}")
    try:
        return float(value)
    except OverflowError:  # An int (or Fraction) beyond float's range.
        raise ValueError(
            f"{where}: expected {expected}, got a number too large for a float"
        ) from None


def _in_range(value: Any, field: attrs.Attribute, expected: str, ok: bool | None = None) -> float:  # type: ignore[type-arg]
    where = f"AdamConfig.{field.name}"
    number = _real(value, where, expected)
    if not (ok if ok is not None else math.isfinite(number) and number >= 0.0):
        raise ValueError(f"{where}: expected {expected}, got {value!r}")
    return number


def _non_negative(value: Any, field: attrs.Attribute) -> float:  # type: ignore[type-arg]
    return _in_range(value, field, "a finite number >= 0")


def _beta(value: Any, field: attrs.Attribute) -> float:  # type: ignore[type-arg]
    number = _real(value, f"AdamConfig.{field.name}", "a number in [0, 1)")
    return _in_range(number, field, "a number in [0, 1)", 0.0 <= number < 1.0)  # False for NaN.


def _learning_rate(value: Any, field: attrs.Attribute) -> Any:  # type: ignore[type-arg]
    if callable(value) and not isinstance(value, numbers.Number):
        return value  # A schedule; each rate it returns is checked when a step uses it.
    return _in_range(value, field, "a finite number >= 0 or a schedule")


def _flag(value: Any, field: attrs.Attribute) -> bool:  # type: ignore[type-arg]
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"AdamConfig.{field.name}: expected True or False, got {type(value).__name__} {value!r}"
        )
    return bool(value)


def _counter(record: str) -> attrs.Converter:  # type: ignore[type-arg]
    """Checks an int >= 0: a state's counters, and max_consecutive_skips (which may be None)."""

    def convert(value: Any, field: attrs.Attribute) -> Any:  # type: ignore[type-arg]
        where = f"{record}.{field.name}"
        optional = field.default is None
        expected = "None or an int >= 0" if optional else "an int >= 0"
        if value is None and optional:
            return None
        if not optional and is_foreign(value):
            # A count held in an array of another library (under jax.jit, a traced one).
            xp = namespace(value, where)
            if getattr(value, "ndim", None) == 0 and xp.isdtype(value.dtype, "integral"):
                return value
            raise TypeError(f"{where}: expected an int >= 0 or a 0-d integer array, got {value!r}")
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"{where}: expected {expected}, got {value!r}")
        return int(value)

    return attrs.Converter(convert, takes_field=True)


_DEFAULT_MOMENTS = {np.dtype(np.float16): np.dtype(np.float32)}

# What other libraries call the hyperparameters (torch, optax, Keras), and what this package does.
_OTHER_NAMES = {
    "betas": "beta1=..., beta2=... (torch's betas=(beta1, beta2))",
    "learning_rate": "lr",
    "b1": "beta1",
    "beta_1": "beta1",
    "b2": "beta2",
    "beta_2": "beta2",
    "epsilon": "eps",
    "mu_dtype": "moment_dtype",
    "weight_decay_rate": "weight_decay",
    "global_clipnorm": "clip_by_global_norm(grads, max_norm) before the step",
    "clipnorm": "clip_by_global_norm(grads, max_norm) before the step",
    "max_grad_norm": "clip_by_global_norm(grads, max_norm) before the step",
    "mask": "a tree of AdamConfigs as the config (see the migration page)",
    "exclude_from_weight_decay": "a tree of AdamConfigs as the config (see the migration page)",
    "foreach": None,
    "fused": None,
    "capturable": None,
    "differentiable": None,
}


def check_names(owner: str, kwargs: dict[str, Any]) -> None:
    """Raises ``TypeError`` for a keyword that is no field of `AdamConfig`, saying what this
    package calls it where another library's name was used.
    """
    for name in kwargs:
        if name in _FIELD_NAMES:
            continue
        if name in _OTHER_NAMES:
            hint = _OTHER_NAMES[name]
            advice = (
                f"this package calls it {hint}"
                if hint
                else "this package has no such option (it needs none)"
            )
        else:
            advice = f"expected one of {', '.join(_FIELD_NAMES)}"
        raise TypeError(f"{owner}: unexpected keyword argument {name!r}; {advice}")


def _moment_dtype(value: Any) -> np.dtype | str | None:
    expected = "None, 'params' or a floating-point dtype such as 'float32'"
    if value is None or (isinstance(value, str) and value == "params"):
        return None if value is None else "params"
    try:
        dtype: np.dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"AdamConfig.moment_dtype: expected {expected}, got {type(value).__name__} {value!r}"
        ) from None
    if dtype.kind != "f":
        raise ValueError(f"AdamConfig.moment_dtype: expected {expected}, got dtype {dtype}")
    return dtype


def _nonfinite(value: Any) -> str:
    expected = f"one of {', '.join(map(repr, _NONFINITE_POLICIES))}"
    if not isinstance(value, str):
        raise TypeError(
            f"AdamConfig.nonfinite: expected {expected}, got {type(value).__name__} {value!r}"
        )
    if value not in _NONFINITE_POLICIES:
        raise ValueError(f"AdamConfig.nonfinite: expected {expected}, got {value!r}")
    return value


_FLAG = attrs.Converter(_flag, takes_field=True)
_NON_NEGATIVE = attrs.Converter(_non_negative, takes_field=True)
_BETA = attrs.Converter(_beta, takes_field=True)


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
      nesterov: Nesterov momentum as ``optax.adam(nesterov=True)`` computes it (Dozat 2016): the
        step uses ``beta1 * m / (1 - beta1**(t+1)) + (1 - beta1) * g / (1 - beta1**t)`` in place
        of ``m_hat``. Unlike ``torch.optim.NAdam``, the momentum is not decayed further.
      eps_root: added to ``v_hat`` inside the square root, >= 0, as optax's ``eps_root``: keeps
        the update differentiable where ``v`` is 0.
      moment_dtype: the dtype of ``m``, ``v`` and ``v_max`` (optax's ``mu_dtype``, for all
        moments). ``None`` (the default): the parameters' dtype, but float32 for float16
        parameters, whose float16 moments would underflow and overflow; ``"params"``: always the
        parameters' dtype (as releases before 0.2 did); or a floating dtype, e.g. ``"float32"``
        for float64 parameters to halve the state's memory.
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
decoupled_weight_decay=False, amsgrad=False, maximize=False, nesterov=False, eps_root=0.0, \
moment_dtype=None, nonfinite='raise', max_consecutive_skips=None)
      >>> AdamConfig(lr=-1.0)
      Traceback (most recent call last):
      ...
      ValueError: AdamConfig.lr: expected a finite number >= 0 or a schedule, got -1.0
    """

    lr: float | Schedule = attrs.field(
        default=1e-3, converter=attrs.Converter(_learning_rate, takes_field=True)
    )
    beta1: float = attrs.field(default=0.9, converter=_BETA)
    beta2: float = attrs.field(default=0.999, converter=_BETA)
    eps: float = attrs.field(default=1e-8, converter=_NON_NEGATIVE)
    weight_decay: float = attrs.field(default=0.0, converter=_NON_NEGATIVE)
    decoupled_weight_decay: bool = attrs.field(default=False, kw_only=True, converter=_FLAG)
    amsgrad: bool = attrs.field(default=False, kw_only=True, converter=_FLAG)
    maximize: bool = attrs.field(default=False, kw_only=True, converter=_FLAG)
    nesterov: bool = attrs.field(default=False, kw_only=True, converter=_FLAG)
    eps_root: float = attrs.field(default=0.0, kw_only=True, converter=_NON_NEGATIVE)
    moment_dtype: np.dtype | str | None = attrs.field(
        default=None, kw_only=True, converter=_moment_dtype
    )
    nonfinite: NonFinitePolicy = attrs.field(default="raise", kw_only=True, converter=_nonfinite)
    max_consecutive_skips: int | None = attrs.field(
        default=None, kw_only=True, converter=_counter("AdamConfig")
    )

    def learning_rate(self, t: int) -> float:
        """Returns the learning rate of step ``t`` (1-based), checked to be finite and >= 0.

        Raises:
          ValueError: a schedule returned a negative, infinite or NaN rate.
          TypeError: a schedule returned something that is not a real number.
        """
        lr = self.lr
        if isinstance(lr, float):
            return lr
        value = lr(t)
        where = f"AdamConfig.lr({t})"
        expected = "a finite number >= 0 from the schedule"
        rate = _real(value, where, expected)
        if not (math.isfinite(rate) and rate >= 0.0):
            raise ValueError(f"{where}: expected {expected}, got {value!r}")
        return rate

    def __new__(cls, *args: Any, **kwargs: Any) -> AdamConfig:
        # Only to answer the names other libraries use (betas=, learning_rate=, ...) with this
        # package's own; attrs' __init__ does the rest.
        check_names("AdamConfig", kwargs)
        return super().__new__(cls)

    def moments_dtype(self, params_dtype: np.dtype) -> np.dtype:
        """The dtype of the moments of parameters of ``params_dtype`` (see ``moment_dtype``)."""
        chosen = self.moment_dtype
        if chosen is None:
            return _DEFAULT_MOMENTS.get(params_dtype, params_dtype)
        if chosen == "params":
            return params_dtype
        return chosen  # type: ignore[return-value]

    def __reduce__(self) -> tuple[Any, ...]:
        return (unpickle, (AdamConfig, PICKLE_VERSION, attrs.asdict(self, recurse=False)))

    @classmethod
    def _from_pickle(cls, fields: dict[str, Any]) -> AdamConfig:
        # Releases before 0.2 had no moment_dtype and kept the moments in the parameters' dtype.
        return cls(**{"moment_dtype": "params", **fields})


# -------------------------------------------------------------------------------------------------
# The state.

# Arrays that this package made and made read-only, and that nothing else can write: a state takes
# them as they are. Any other array is copied into a state, since whoever holds it could write it.
# By id(), with a weak reference that tells whether the id still names that array; the entries of
# dead arrays are dropped whenever the table has doubled since the last sweep.
_SEALED: dict[int, weakref.ref[np.ndarray]] = {}
_SWEEP_AT = [1024]


def seal(array: np.ndarray) -> np.ndarray:
    """Marks ``array``, which the caller just made and shares with no one, read-only for good.

    A state built from sealed arrays (`adam_init`, `adam_update`) takes them without a copy.
    """
    array.setflags(write=False)
    _SEALED[id(array)] = weakref.ref(array)
    if len(_SEALED) >= _SWEEP_AT[0]:
        # list() copies the table in one call, while other threads may seal arrays meanwhile.
        for key, ref in list(_SEALED.items()):
            if ref() is None:
                _SEALED.pop(key, None)
        _SWEEP_AT[0] = max(1024, 2 * len(_SEALED))
    return array


def _sealed(array: Any) -> bool:
    ref = _SEALED.get(id(array))
    return ref is not None and ref() is array


def _freeze(array: Any) -> Any:
    """Returns a read-only array with the values of ``array`` that nothing else can write.

    Another library's array is taken as it is: JAX's cannot be written, and a torch tensor
    cannot be made read-only (the update gives states fresh ones that nothing else holds).
    """
    if is_sealed(array) or is_foreign(array):
        return array
    return seal(np.array(array, copy=True, order="C", subok=False))


def is_sealed(array: Any) -> bool:
    """Whether ``array`` was sealed, or is a read-only view of a sealed array (which no one can
    make writeable: its base is not)."""
    if _sealed(array):
        return True
    base = getattr(array, "base", None)
    return (
        type(base) is np.ndarray
        and _sealed(base)
        and not array.flags.writeable
        and type(array) is np.ndarray
    )


def _frozen_tree(tree: Any, field: attrs.Attribute) -> Any:  # type: ignore[type-arg]
    name = f"AdamState.{field.name}"
    if tree is None and field.default is None:
        return None
    # v_max holds None at the leaves whose config has no AMSGrad.
    leaves, treedef = _tree.flatten(tree, name, none_leaves=field.name == "v_max")
    for index, leaf in enumerate(leaves):
        if leaf is not None and not _is_floating(leaf, name):
            raise TypeError(
                f"{_tree.LeafPaths(treedef, name)[index]}: expected a floating-point array, got "
                f"dtype {leaf.dtype}"
            )
    frozen = [None if leaf is None else _freeze(leaf) for leaf in leaves]
    if all(a is b for a, b in zip(frozen, leaves)):
        return tree  # Sealed arrays only (a state's own, or the update's): shared as they are.
    return _tree.unflatten(treedef, frozen)


def _is_floating(leaf: Any, where: str) -> bool:
    if isinstance(leaf, np.ndarray):
        return bool(leaf.dtype.kind == "f")
    return bool(namespace(leaf, where).isdtype(leaf.dtype, "real floating"))


def _tree_equal(a: Any, b: Any) -> bool:
    """True when two trees have the same structure, dtypes, shapes and values (NaN equals NaN)."""
    if a is None or b is None:
        return a is b
    leaves_a, treedef = _tree.flatten(a, "a", none_leaves=True)
    try:
        # Walked along a's structure: dicts are equal whatever the order of their keys.
        leaves_b = _tree.flatten_like(b, treedef, "b")
    except ValueError:
        return False
    return all((x is None and y is None) or _array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def _array_equal(x: Any, y: Any) -> bool:
    if is_foreign(x) and is_foreign(y) and library(x) == library(y):
        x, y = to_numpy(x), to_numpy(y)
    return (
        isinstance(x, np.ndarray)
        and isinstance(y, np.ndarray)
        and x.dtype == y.dtype
        and x.shape == y.shape
        and np.array_equal(x, y, equal_nan=True)
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
    leaves, treedef = _tree.flatten(tree, "tree", none_leaves=True)
    return repr(_tree.unflatten(treedef, [None if x is None else _Spec(x) for x in leaves]))


_TREE_EQ = attrs.cmp_using(eq=_tree_equal)
_MOMENTS = attrs.Converter(_frozen_tree, takes_field=True)
_STATE_COUNT = _counter("AdamState")


@attrs.frozen(unsafe_hash=False, repr=False)
class AdamState:
    """The moments of Adam for one tree of parameters: immutable, with read-only arrays.

    ``m``, ``v`` (and ``v_max`` with AMSGrad) have the structure and shapes of the parameters
    they were made for, in the dtype the config's ``moment_dtype`` gives (the parameters' own,
    float32 for float16 parameters, by default). Construction copies any array that something
    else could still write, and marks every array read-only, so a state never changes after it
    is made.

    Names follow Kingma & Ba's Algorithm 1. In optax's ``ScaleByAdamState`` they are ``mu``,
    ``nu`` and ``count``; in ``torch.optim.Adam``'s state, ``exp_avg``, ``exp_avg_sq`` and
    ``step`` (and ``max_exp_avg_sq`` for ``v_max``).

    Args:
      m: the first moment, an exponential moving average of the gradients.
      v: the second raw moment, an exponential moving average of the squared gradients.
      t: the number of steps taken, a Python ``int``: exact for any number of steps (torch keeps
        a float32 tensor, optax a saturating int32).
      v_max: with AMSGrad, the elementwise maximum of every ``v`` so far; else ``None``. With
        a config tree where only some leaves use AMSGrad, a tree like ``m`` with ``None`` at
        the others.
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

    m: ArrayTree = attrs.field(eq=_TREE_EQ, converter=_MOMENTS)
    v: ArrayTree = attrs.field(eq=_TREE_EQ, converter=_MOMENTS)
    t: int = attrs.field(converter=_STATE_COUNT)
    v_max: ArrayTree | None = attrs.field(default=None, eq=_TREE_EQ, converter=_MOMENTS)
    skipped: int = attrs.field(default=0, converter=_STATE_COUNT)
    consecutive_skips: int = attrs.field(default=0, converter=_STATE_COUNT)

    def __attrs_post_init__(self) -> None:
        if not _registered and sys.modules.get("jax") is not None:
            register_with_jax()  # JAX was imported after this package.
        if type(self.m) is np.ndarray and type(self.v) is np.ndarray:  # One array: no walk.
            pairs = [(self.v, self.m)] + ([] if self.v_max is None else [(self.v_max, self.m)])
            if all(a.shape == b.shape and a.dtype == b.dtype for a, b in pairs):
                return
        m_leaves, m_def = _tree.flatten(self.m, "AdamState.m")
        for name in ("v", "v_max"):
            tree = getattr(self, name)
            if tree is None:
                continue
            leaves = _tree.flatten_like(tree, m_def, f"AdamState.{name}", "AdamState.m")
            paths = _tree.LeafPaths(m_def, f"AdamState.{name}")
            for index, (leaf, m_leaf) in enumerate(zip(leaves, m_leaves)):
                if leaf is None and name == "v_max":
                    continue
                if not (isinstance(leaf, np.ndarray) or is_foreign(leaf)):
                    raise ValueError(
                        f"{paths[index]}: expected an array like AdamState.m, got "
                        f"{type(leaf).__name__}"
                    )
                if tuple(leaf.shape) != tuple(m_leaf.shape) or leaf.dtype != m_leaf.dtype:
                    raise ValueError(
                        f"{paths[index]}: expected {m_leaf.dtype}{list(m_leaf.shape)} like "
                        f"AdamState.m, got {leaf.dtype}{list(leaf.shape)}"
                    )

    @classmethod
    def _of_checked(
        cls, m: Any, v: Any, t: Any, v_max: Any, skipped: Any, consecutive_skips: Any
    ) -> AdamState:
        """A state of arrays that the update has just made, sealed and checked against the
        parameters: built as the constructor would, without its walk over the trees (which would
        find nothing to copy and nothing to refuse)."""
        if not _registered and sys.modules.get("jax") is not None:
            register_with_jax()
        state = cls.__new__(cls)
        # The fields' own setters, called one by one: half the cost of a loop of setattr.
        set_m, set_v, set_t, set_v_max, set_skipped, set_streak = _SETTERS
        set_m(state, m)
        set_v(state, v)
        set_t(state, t)
        set_v_max(state, v_max)
        set_skipped(state, skipped)
        set_streak(state, consecutive_skips)
        return state

    def __repr__(self) -> str:
        return (
            f"AdamState(t={self.t}, skipped={self.skipped}, "
            f"consecutive_skips={self.consecutive_skips}, m={_tree_repr(self.m)}, "
            f"v={_tree_repr(self.v)}, v_max={_tree_repr(self.v_max)})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {field.name: getattr(self, field.name) for field in attrs.fields(AdamState)}
        return (unpickle, (AdamState, PICKLE_VERSION, fields))

    @classmethod
    def _from_pickle(cls, fields: dict[str, Any]) -> AdamState:
        # The unpickled arrays belong to nobody else yet: seal them where they are, no copies.
        fields = dict(fields)
        for name in ("m", "v", "v_max"):
            tree = fields.get(name)
            if tree is not None:
                try:
                    leaves, _ = _tree.flatten(tree, f"AdamState.{name}")
                except TypeError:
                    continue  # The constructor says what is wrong.
                for leaf in leaves:
                    if type(leaf) is np.ndarray and leaf.base is None and leaf.flags.owndata:
                        seal(leaf)
        return cls(**fields)


_FIELD_NAMES = tuple(field.name for field in attrs.fields(AdamConfig))


# tree_map(jnp.asarray, state) maps over a state's moments and keeps its counts.
_tree.register_record(AdamState, ("m", "v", "v_max"))

_FIELDS = ("m", "v", "t", "v_max", "skipped", "consecutive_skips")
_SETTERS = tuple(getattr(AdamState, name).__set__ for name in _FIELDS)


def _flatten_state(state: AdamState) -> tuple[tuple[Any, ...], None]:
    return tuple(getattr(state, name) for name in _FIELDS), None


def _unflatten_state(_: None, children: Any) -> AdamState:
    # JAX rebuilds nodes from placeholders as well as from arrays (tree_util, tracing): the
    # values are taken as they come, as attrs' own pickling support restores them.
    state = AdamState.__new__(AdamState)
    state.__setstate__(dict(zip(_FIELDS, children)))  # type: ignore[attr-defined]
    return state


_registered = False


def register_with_jax() -> None:
    """Makes `AdamState` a JAX pytree (its arrays and counts the children) and `AdamConfig` a
    leafless one (static data), once, when JAX is already imported."""
    global _registered
    if _registered or sys.modules.get("jax") is None:
        return
    import jax

    jax.tree_util.register_pytree_node(AdamState, _flatten_state, _unflatten_state)
    jax.tree_util.register_pytree_node(
        AdamConfig, lambda config: ((), config), lambda config, _: config
    )
    _registered = True


register_with_jax()
