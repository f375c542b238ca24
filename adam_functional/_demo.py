"""The tour behind ``python -m adam_functional``.

1. The seed notebook's 2x2 example, run through the pure ``adam_init``/``adam_update`` and the
   in-place ``Adam.step`` side by side: the weights agree bit for bit.
2. A tiny MLP, its parameters a dict tree, trained on synthetic "two moons" with gradients written
   out in NumPy and a plain loop over ``adam_update``.
3. With ``--plot FILE.png``: Adam, AdamW, AMSGrad and a warmup-cosine schedule on the Rosenbrock
   function (needs matplotlib, the ``[plot]`` extra).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt

from adam_functional import Adam, AdamConfig, adam_init, adam_update, schedules

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["main"]

Array: TypeAlias = npt.NDArray[np.float64]
Params: TypeAlias = dict[str, dict[str, Array]]

PLOT_EXTRA = 'pip install "adam-functional[plot]"'
PLOT_EXTRA_MISSING = f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}"


# 1. The notebook's example, pure and in place ------------------------------------------------


def replay_notebook_example(steps: int = 5) -> bool:
    """Prints the notebook's weights from ``adam_update`` and ``Adam.step``; True if identical."""
    # The notebook calls np.random.seed(42) and draws from the global generator; a RandomState
    # seeded the same way draws the same numbers without touching global state.
    rng = np.random.RandomState(42)
    weights = rng.randn(2, 2)
    grads = rng.randn(2, 2)

    config = AdamConfig(lr=0.01)
    pure = weights.copy()
    state = adam_init(pure, config)

    optimizer = Adam(lr=0.01)
    in_place = weights.copy()

    print("1) The notebook's example through both APIs")
    print(f"   np.random.seed(42); W = randn(2, 2); grads = randn(2, 2); lr = 0.01; {steps} steps")
    print(f"   {'step':>4}  {'W from adam_update (pure)':<43}  W from Adam.step (in place)")
    identical = True
    for step in range(1, steps + 1):
        pure, state = adam_update(pure, grads, state, config)
        optimizer.step(in_place, grads)
        identical &= pure.tobytes() == in_place.tobytes()  # bit for bit, not just close
        for row, (left, right) in enumerate(zip(_rows(pure), _rows(in_place), strict=True)):
            label = str(step) if row == 0 else ""
            print(f"   {label:>4}  {left}  {right}")
    print(f"identical: {identical}  (bit for bit, all {steps} steps)")
    return identical


def _rows(array: Array) -> list[str]:
    # Each number with the fewest digits that read back to the same float (as repr does), so the
    # printed weights are the exact weights; padded to line up on the decimal point.
    return [
        "["
        + " ".join(
            np.format_float_positional(x, unique=True, pad_left=2, pad_right=17) for x in row
        )
        + "]"
        for row in array
    ]


# 2. A tiny MLP trained with a functional loop ------------------------------------------------


def two_moons(n: int, rng: np.random.Generator, noise: float = 0.15) -> tuple[Array, Array]:
    """``n`` points on two interleaving half circles, and their 0/1 labels."""
    labels = rng.integers(0, 2, n).astype(np.float64)
    angle = rng.uniform(0.0, np.pi, n)
    upper = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    lower = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)
    points = np.where(labels[:, None] == 0.0, upper, lower)
    return points + noise * rng.standard_normal((n, 2)), labels


def init_mlp(rng: np.random.Generator, hidden: int = 16) -> Params:
    """A 2 -> ``hidden`` (tanh) -> 1 (logistic) network, as a tree of arrays."""
    return {
        "hidden": {
            "w": rng.standard_normal((2, hidden)) / np.sqrt(2.0),
            "b": np.zeros(hidden),
        },
        "output": {
            "w": rng.standard_normal(hidden) / np.sqrt(hidden),
            "b": np.zeros(1),
        },
    }


def loss_and_grads(params: Params, x: Array, y: Array) -> tuple[float, float, Params]:
    """Binary cross-entropy, accuracy and the gradient tree, by hand."""
    hidden = np.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    logits = hidden @ params["output"]["w"] + params["output"]["b"]
    # log(1 + e^z) - y z is the cross-entropy of sigmoid(z), without overflow for large |z|.
    loss = float(np.mean(np.logaddexp(0.0, logits) - y * logits))
    accuracy = float(np.mean((logits > 0.0) == (y == 1.0)))

    probability = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid, without overflow
    d_logits = (probability - y) / len(y)
    d_hidden = np.outer(d_logits, params["output"]["w"]) * (1.0 - hidden**2)
    grads = {
        "hidden": {"w": x.T @ d_hidden, "b": d_hidden.sum(axis=0)},
        "output": {"w": hidden.T @ d_logits, "b": d_logits.sum(keepdims=True)},
    }
    return loss, accuracy, grads


def train_mlp(*, steps: int, seed: int, lr: float) -> list[float]:
    """Trains the MLP with ``adam_update`` in a plain loop; prints progress, returns the losses."""
    rng = np.random.default_rng(seed)
    x, y = two_moons(400, rng)
    params = init_mlp(rng)
    config = AdamConfig(lr=lr)
    state = adam_init(params, config)

    print(f"2) A 2-16-1 MLP on 400 'two moons' points: {steps} steps of adam_update, lr = {lr}")
    live = sys.stdout.isatty()  # one line updated in place on a terminal, plain lines otherwise
    every = max(1, steps // 10)
    losses: list[float] = []
    for step in range(1, steps + 1):
        loss, accuracy, grads = loss_and_grads(params, x, y)
        params, state = adam_update(params, grads, state, config)
        losses.append(loss)
        if live or step % every == 0 or step in (1, steps):
            line = f"   step {step:>{len(str(steps))}}  loss {loss:.4f}  accuracy {accuracy:6.1%}"
            print(f"\r{line}" if live else line, end="" if live else "\n", flush=live)
    if live:
        print()
    print(f"first loss {losses[0]:.6f}, last loss {losses[-1]:.6f}")
    return losses


# 3. Rosenbrock trajectories ------------------------------------------------------------------


def rosenbrock(p: Array) -> float:
    """``(1 - x)^2 + 100 (y - x^2)^2``: a curved valley with its minimum 0 at (1, 1)."""
    x, y = p
    return float((1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2)


def rosenbrock_grad(p: Array) -> Array:
    """The gradient of `rosenbrock`, by hand."""
    x, y = p
    return np.array([-2.0 * (1.0 - x) - 400.0 * x * (y - x**2), 200.0 * (y - x**2)])


def rosenbrock_configs(steps: int) -> dict[str, AdamConfig]:
    """The optimizers compared on the plot, by label."""
    # Up to 0.1 over the first tenth of the steps, then a cosine down to 0.001 at the last one.
    schedule = schedules.warmup_cosine_decay(0.1, steps // 10, steps, end_value=1e-3)
    return {
        "Adam (lr 0.05)": AdamConfig(lr=0.05),
        "AdamW (lr 0.05, decoupled wd 0.1)": AdamConfig(
            lr=0.05, weight_decay=0.1, decoupled_weight_decay=True
        ),
        "AMSGrad (lr 0.05)": AdamConfig(lr=0.05, amsgrad=True),
        "Adam, warmup + cosine decay (peak 0.1)": AdamConfig(lr=schedule),
    }


def minimize(grad: Callable[[Array], Array], start: Array, config: AdamConfig, steps: int) -> Array:
    """Runs ``adam_update`` from ``start``; returns the path, one row per point."""
    params = start
    state = adam_init(params, config)
    path = [params]
    for _ in range(steps):
        params, state = adam_update(params, grad(params), state, config)
        path.append(params)
    return np.stack(path)


def plot_rosenbrock(file: Path, *, steps: int) -> None:
    """Draws the trajectories on Rosenbrock's contours and their loss curves into ``file``."""
    # matplotlib is optional: import it only here. Figure with the Agg canvas draws off screen
    # and leaves pyplot's global state (and the user's backend) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    start = np.array([-1.5, 2.0])
    paths = {
        label: minimize(rosenbrock_grad, start, config, steps)
        for label, config in rosenbrock_configs(steps).items()
    }

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg
    contours: Axes
    curves: Axes
    contours, curves = figure.subplots(1, 2, width_ratios=[1.15, 1])

    x, y = np.meshgrid(np.linspace(-2.0, 2.0, 400), np.linspace(-1.0, 3.0, 400))
    z = (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2
    contours.contour(x, y, z, levels=np.logspace(-1, 3.5, 16), colors="0.75", linewidths=0.8)
    # The paths share the valley floor, so each gets its own dash pattern and an end marker.
    styles = ["-", "--", ":", "-."]
    for (label, path), style in zip(paths.items(), styles, strict=True):
        (line,) = contours.plot(path[:, 0], path[:, 1], style, linewidth=2.0, label=label)
        contours.plot(*path[-1], "o", color=line.get_color(), markersize=7)
    contours.plot(*start, "ks", markersize=7, label="start (-1.5, 2)")
    contours.plot(1, 1, "*", ms=18, color="gold", mec="k", zorder=1.5, label="minimum (1, 1)")
    contours.set(xlabel="x", ylabel="y", title=f"Rosenbrock function, {steps} steps (dot: end)")
    contours.legend(loc="lower left", fontsize="small", framealpha=0.9)

    for (label, path), style in zip(paths.items(), styles, strict=True):
        curves.plot([rosenbrock(p) for p in path], style, linewidth=2.0, label=label)
    curves.set(xlabel="step", ylabel="f(x, y)", yscale="log", title="Loss (log scale)")
    curves.grid(True, which="major", alpha=0.3)
    curves.legend(fontsize="small")

    figure.savefig(file, dpi=110)


# Command line --------------------------------------------------------------------------------


DESCRIPTION = """\
A short tour of adam_functional:
  1) the seed notebook's 2x2 example through the pure adam_update and the
     in-place Adam.step side by side (the weights must be identical);
  2) a tiny MLP trained on synthetic data with a plain loop over adam_update;
  3) with --plot, optimizer paths on the Rosenbrock function."""

EPILOG = f"""\
--plot needs matplotlib: {PLOT_EXTRA}

exit status: 0 on success, 1 if adam_update and Adam.step disagree,
2 on a usage error or when --plot lacks matplotlib."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m adam_functional",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=500,
        metavar="N",
        help="training steps for the MLP (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=0.02,
        help="learning rate for the MLP (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        help="seed of the numpy Generator for the data and the initial weights "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw Adam, AdamW, AMSGrad and a warmup-cosine schedule on the Rosenbrock "
        "function, with their loss curves, into FILE.png (needs matplotlib, see below)",
    )
    parser.add_argument(
        "--plot-steps",
        type=_int_at_least(10),
        default=1000,
        metavar="N",
        help="steps of each optimizer on the Rosenbrock plot, >= 10 (default: %(default)s)",
    )
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _have_matplotlib() -> bool:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Runs the tour; returns the exit status.

    Args:
      argv: the arguments, without the program name; ``None`` reads ``sys.argv``.

    Returns:
      0 on success, 1 if ``adam_update`` and ``Adam.step`` disagree, 2 if ``--plot`` is given
      but matplotlib is missing. ``--help`` and usage errors exit through ``SystemExit`` as
      argparse does.
    """
    args = build_parser().parse_args(argv)
    if args.plot is not None and not _have_matplotlib():
        print(f"error: {PLOT_EXTRA_MISSING}", file=sys.stderr)
        return 2

    identical = replay_notebook_example()
    print()
    train_mlp(steps=args.steps, seed=args.seed, lr=args.lr)
    if args.plot is not None:
        plot_rosenbrock(args.plot, steps=args.plot_steps)
        print(f"\n3) Rosenbrock trajectories and loss curves written to {args.plot}")
    return 0 if identical else 1
