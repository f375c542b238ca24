"""The implementations the benchmark times, each set up on one size and dtype.

- ``notebook``: the seed notebook's ``Adam`` class (``adam_functional.bench.notebook``), the
  baseline; on a tree it steps one leaf at a time.
- ``adam_update``: the pure update, with the new parameters and state threaded through.
- ``Adam.step``: the in-place wrapper.
- ``torch-foreach`` / ``torch-fused``: ``torch.optim.Adam`` on CPU with ``foreach=True`` /
  ``fused=True``, stepped under ``torch.no_grad()``, the tree's arrays as one parameter list (when
  torch is installed).
- ``Adam.step-torch``: this package's in-place wrapper on the same torch tensors (written
  through NumPy views of their memory; when torch and array-api-compat are installed).
- ``adam_update-jax``: this package's pure update on JAX arrays under ``jax.jit``, the state an
  argument (when jax and array-api-compat are installed).
- ``optax-jit`` / ``optax-jit-donate``: ``optax.adam`` plus ``optax.apply_updates`` under
  ``jax.jit``, without and with donation of the parameters and state (``donate_argnums``), float64
  through ``jax_enable_x64`` (when jax and optax are installed). Every step is blocked on with
  ``jax.block_until_ready``, so a step's time is its latency, as for the NumPy implementations.

All use the default configuration (``lr=1e-3``, ``beta1=0.9``, ``beta2=0.999``, ``eps=1e-8``, no
weight decay) on fixed gradients, so the time is the optimizer's alone; ``adam_update`` and
``Adam.step`` include their check for non-finite gradients, torch and optax have none.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import attrs
import numpy as np

from adam_functional import Adam, AdamConfig, adam_init, adam_update
from adam_functional.bench.notebook import Adam as NotebookAdam
from adam_functional.bench.sizes import leaves, nbytes, tree_map

__all__ = [
    "IMPLEMENTATIONS",
    "Libraries",
    "Runner",
    "Unsupported",
    "jax_x64",
    "load_libraries",
    "make_runner",
]

#: Implementation names, in table order; ``notebook`` is the baseline of the ratios.
IMPLEMENTATIONS = (
    "notebook",
    "adam_update",
    "Adam.step",
    "torch-foreach",
    "torch-fused",
    "Adam.step-torch",
    "optax-jit",
    "optax-jit-donate",
    "adam_update-jax",
)
_TORCH_IMPLEMENTATIONS = ("torch-foreach", "torch-fused", "Adam.step-torch")
_JAX_IMPLEMENTATIONS = ("optax-jit", "optax-jit-donate", "adam_update-jax")


class Unsupported(Exception):
    """The implementation cannot run this case (reported as n/a with the reason)."""


class Runner:
    """One implementation set up on one case; ``step`` makes one step and waits for it."""

    #: None when tracemalloc sees the implementation's memory, else why it does not.
    memory_unseen: str | None = None

    def step(self) -> None:
        raise NotImplementedError

    def output_nbytes(self) -> int:
        """Bytes of the arrays the last step had to return (0 for an in-place step)."""
        return 0


class _NotebookRunner(Runner):
    def __init__(self, params: Any, grads: Any) -> None:
        self.opt: Any = NotebookAdam()  # type: ignore[no-untyped-call]
        self.pairs = list(zip(leaves(tree_map(np.copy, params)), leaves(grads), strict=True))

    def step(self) -> None:
        step = self.opt.step
        for p, g in self.pairs:
            step(p, g)


class _PureRunner(Runner):
    def __init__(self, params: Any, grads: Any) -> None:
        self.config = AdamConfig()
        self.params = tree_map(np.copy, params)
        self.grads = grads
        self.state = adam_init(self.params, self.config)

    def step(self) -> None:
        self.params, self.state = adam_update(self.params, self.grads, self.state, self.config)

    def output_nbytes(self) -> int:
        state = self.state
        return nbytes(self.params, state.m, state.v, getattr(state, "v_max", None))


class _WrapperRunner(Runner):
    def __init__(self, params: Any, grads: Any) -> None:
        self.opt = Adam()
        self.params = tree_map(np.copy, params)
        self.grads = grads

    def step(self) -> None:
        self.opt.step(self.params, self.grads)


class _TorchRunner(Runner):
    memory_unseen = "tracemalloc cannot see torch's allocator"

    def __init__(self, torch: ModuleType, params: Any, grads: Any, *, fused: bool) -> None:
        self.torch = torch
        self.params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in leaves(params)]
        for p, g in zip(self.params, leaves(grads), strict=True):
            p.grad = torch.from_numpy(g.copy())
        kind = {"fused": True} if fused else {"foreach": True}
        try:
            self.opt = torch.optim.Adam(self.params, lr=1e-3, **kind)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise Unsupported(f"torch: {exc}") from exc

    def step(self) -> None:
        with self.torch.no_grad():
            self.opt.step()


class _OptaxRunner(Runner):
    memory_unseen = "tracemalloc cannot see XLA's allocator"

    def __init__(
        self, jax: ModuleType, optax: ModuleType, params: Any, grads: Any, *, donate: bool
    ) -> None:
        self.jax = jax
        jnp = jax.numpy
        # jnp.array copies, so donated buffers belong to this runner alone.
        self.params = tree_map(jnp.array, params)
        self.grads = tree_map(jnp.array, grads)
        if leaves(self.params)[0].dtype != leaves(params)[0].dtype:
            raise Unsupported(f"jax made {leaves(self.params)[0].dtype} arrays")
        opt = optax.adam(1e-3)
        self.state = opt.init(self.params)

        def adam_step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.fn = jax.jit(adam_step, donate_argnums=(0, 1) if donate else ())

    def step(self) -> None:
        self.params, self.state = self.fn(self.params, self.state, self.grads)
        self.jax.block_until_ready((self.params, self.state))


class _TorchWrapperRunner(Runner):
    memory_unseen = "tracemalloc cannot see torch's allocator"

    def __init__(self, torch: ModuleType, params: Any, grads: Any) -> None:
        self.torch = torch
        self.params = [torch.from_numpy(p.copy()) for p in leaves(params)]
        self.grads = [torch.from_numpy(g.copy()) for g in leaves(grads)]
        self.opt = Adam()
        try:
            self.opt.step(self.params, self.grads)  # Fails early without array-api-compat.
        except TypeError as exc:
            raise Unsupported(str(exc)) from exc

    def step(self) -> None:
        self.opt.step(self.params, self.grads)


class _JaxPureRunner(Runner):
    memory_unseen = "tracemalloc cannot see XLA's allocator"

    def __init__(self, jax: ModuleType, params: Any, grads: Any) -> None:
        self.jax = jax
        self.params = tree_map(jax.numpy.array, params)
        self.grads = tree_map(jax.numpy.array, grads)
        if leaves(self.params)[0].dtype != leaves(params)[0].dtype:
            raise Unsupported(f"jax made {leaves(self.params)[0].dtype} arrays")
        config = AdamConfig(nonfinite="skip")  # "raise" cannot raise inside jax.jit.
        try:
            self.state = adam_init(self.params, config)
        except TypeError as exc:
            raise Unsupported(str(exc)) from exc
        self.fn = jax.jit(lambda p, g, s: adam_update(p, g, s, config))

    def step(self) -> None:
        self.params, self.state = self.fn(self.params, self.grads, self.state)
        self.jax.block_until_ready((self.params, self.state))


@attrs.define
class Libraries:
    """The optional libraries a run imported, and what it could not."""

    torch: ModuleType | None = None
    jax: ModuleType | None = None
    optax: ModuleType | None = None
    notes: list[str] = attrs.Factory(list)
    missing: list[str] = attrs.Factory(list)  # wanted but not importable

    def runnable(self, names: Sequence[str]) -> list[str]:
        """``names`` less the implementations whose library is missing."""
        return [
            n
            for n in names
            if not (n in _TORCH_IMPLEMENTATIONS and self.torch is None)
            and not (n in _JAX_IMPLEMENTATIONS and self.jax is None)
        ]


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def load_libraries(names: Sequence[str]) -> Libraries:
    """Imports the libraries that the implementations ``names`` need, noting those missing."""
    libs = Libraries()
    if any(n in _TORCH_IMPLEMENTATIONS for n in names):
        libs.torch = _import("torch")
        if libs.torch is None:
            libs.missing.append("torch")
            libs.notes.append(
                "torch is not installed: skipping torch-foreach, torch-fused, Adam.step-torch"
            )
    if any(n in _JAX_IMPLEMENTATIONS for n in names):
        jax, optax = _import("jax"), _import("optax")
        if jax is None or optax is None:
            missing = [m for m, mod in (("jax", jax), ("optax", optax)) if mod is None]
            libs.missing += missing
            libs.notes.append(
                f"{' and '.join(missing)} not installed: skipping optax-jit, optax-jit-donate, "
                "adam_update-jax"
            )
        else:
            libs.jax, libs.optax = jax, optax
    return libs


def make_runner(name: str, libs: Libraries, params: Any, grads: Any) -> Runner:
    """Sets up the implementation ``name`` on its own copies of ``params`` and ``grads``."""
    if name == "notebook":
        return _NotebookRunner(params, grads)
    if name == "adam_update":
        return _PureRunner(params, grads)
    if name == "Adam.step":
        return _WrapperRunner(params, grads)
    if name == "Adam.step-torch":
        assert libs.torch is not None
        return _TorchWrapperRunner(libs.torch, params, grads)
    if name == "adam_update-jax":
        assert libs.jax is not None
        return _JaxPureRunner(libs.jax, params, grads)
    if name in _TORCH_IMPLEMENTATIONS:
        assert libs.torch is not None
        return _TorchRunner(libs.torch, params, grads, fused=name == "torch-fused")
    if name in _JAX_IMPLEMENTATIONS:
        assert libs.jax is not None
        assert libs.optax is not None
        return _OptaxRunner(libs.jax, libs.optax, params, grads, donate=name.endswith("donate"))
    raise ValueError(f"unknown implementation {name!r}")


@contextlib.contextmanager
def jax_x64(libs: Libraries) -> Iterator[None]:
    """Enables float64 in jax for the run (float32 arrays stay float32), then restores it."""
    if libs.jax is None:
        yield
        return
    config = libs.jax.config
    old = bool(config.read("jax_enable_x64") if hasattr(config, "read") else config.x64_enabled)
    config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        config.update("jax_enable_x64", old)
