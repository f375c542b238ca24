"""The tour behind ``python -m adam_functional``.

1. The from-scratch notebook's 2x2 example, run through the pure ``adam_init``/``adam_update``
   and the in-place ``Adam.step`` side by side: the weights agree bit for bit.
2. A tiny MLP, its parameters a dict tree, trained on synthetic "two moons" with gradients written
   out in NumPy and a plain loop over ``adam_update``.
3. With ``--plot FILE.png``: Adam, AdamW, AMSGrad and a warmup-cosine schedule on the Rosenbrock
   function, one panel of contours each and their loss curves side by side (needs matplotlib, the
   ``[plot]`` extra). ``docs/demo.md`` shows the figure and how to read it.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
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


def plot_rosenbrock(file: Path, *, steps: int) -> dict[str, Array]:
    """Draws each optimizer's path on Rosenbrock's contours, and the loss curves, into ``file``.

    Returns the paths by label, one row per point, as `minimize` gives them.
    """
    # matplotlib is optional: import it only here. Figure with the Agg canvas draws off screen
    # and leaves pyplot's global state (and the user's backend) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine
    from matplotlib.lines import Line2D

    start = np.array([-1.5, 2.0])
    paths = {
        label: minimize(rosenbrock_grad, start, config, steps)
        for label, config in rosenbrock_configs(steps).items()
    }
    colors = [f"C{i}" for i in range(len(paths))]

    # The bottom strip of the figure is left to the caption.
    figure = Figure(figsize=(9, 7.8), layout=ConstrainedLayoutEngine(rect=(0, 0.075, 1, 0.925)))
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg
    rows = figure.add_gridspec(2, 1, height_ratios=[1.0, 1.05], hspace=0.02)
    top, bottom = figure.add_subfigure(rows[0]), figure.add_subfigure(rows[1])

    # The paths share the valley floor and would hide one another on one plot: one small panel
    # each, on the same axes.
    panels: list[Axes] = list(top.subplots(1, 4, sharex=True, sharey=True).flat)
    x, y = np.meshgrid(np.linspace(-2.0, 2.0, 300), np.linspace(-1.0, 3.0, 300))
    z = (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2
    for panel, (label, path), color in zip(panels, paths.items(), colors, strict=True):
        panel.contour(x, y, z, levels=np.logspace(-1, 3.5, 14), colors="0.8", linewidths=0.7)
        panel.plot(path[:, 0], path[:, 1], "-", color=color, linewidth=1.8)
        panel.plot(*start, "ks", markersize=6)
        panel.plot(1, 1, "*", markersize=15, color="gold", markeredgecolor="k")
        panel.plot(*path[-1], "o", color=color, markersize=7, markeredgecolor="k")
        name, _, options = label.partition(" (")
        end_x, end_y = path[-1]
        panel.set_title(f"{name}\n({options}\nends at ({end_x:.2f}, {end_y:.2f})", fontsize=9.5)
        panel.set(aspect="equal", xlabel="x", xticks=[-1, 0, 1])
    panels[0].set_ylabel("y")
    markers = [
        Line2D([], [], linestyle="", marker="s", color="k", markersize=6),
        Line2D([], [], linestyle="", marker="*", color="gold", markeredgecolor="k", markersize=13),
        Line2D([], [], linestyle="", marker="o", color="0.5", markeredgecolor="k", markersize=7),
    ]
    marker_labels = ["start (-1.5, 2)", "minimum (1, 1)", f"end, after {steps} steps"]
    top.legend(markers, marker_labels, loc="outside lower center", ncols=3, frameon=False)
    top.suptitle("Paths on the contours of the Rosenbrock function", fontsize=12)

    curves = bottom.subplots()
    for (label, path), color in zip(paths.items(), colors, strict=True):
        curves.plot([rosenbrock(p) for p in path], color=color, linewidth=1.8, label=label)
    curves.set(xlabel="step", ylabel="f(x, y), log scale", yscale="log")
    curves.grid(True, which="major", alpha=0.3)
    curves.set_title("Loss", fontsize=12)
    bottom.legend(loc="outside right center", frameon=False)

    adamw = next(label for label in paths if label.startswith("AdamW"))
    end_x, end_y = paths[adamw][-1]
    figure.text(
        0.5,
        0.012,
        f"AdamW stops short of the minimum, at ({end_x:.2f}, {end_y:.2f}): its decoupled weight "
        "decay shrinks the parameters\ntowards (0, 0) at every step, and on the nearly flat "
        "valley floor that pull holds back the gradient's.",
        ha="center",
        va="bottom",
        fontsize=11,
    )

    figure.savefig(file, dpi=120)
    return paths


# Command line --------------------------------------------------------------------------------


DESCRIPTION = """\
A short tour of adam_functional:
  1) the from-scratch notebook's 2x2 example through the pure adam_update and
     the in-place Adam.step side by side (the weights must be identical);
  2) a tiny MLP trained on synthetic data with a plain loop over adam_update;
  3) with --plot, optimizer paths on the Rosenbrock function."""

EPILOG = f"""\
--plot needs matplotlib: {PLOT_EXTRA}
Its file is checked before anything runs: the folder must exist and be
writable, and the suffix a format matplotlib writes (.png, .pdf, .svg, ...).

exit status: 0 on success, 1 if adam_update and Adam.step disagree,
2 on a usage error or a --plot file that cannot be written."""


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
        help="also run Adam, AdamW, AMSGrad and a warmup-cosine schedule on the Rosenbrock "
        "function and draw their paths, one panel each, and their loss curves into FILE.png "
        "(needs matplotlib, see below)",
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


def plot_file_problem(file: Path) -> str | None:
    """Why ``--plot file`` would fail, found before any work is done; ``None`` if it will not."""
    try:
        from matplotlib import backend_bases
    except ImportError:
        return PLOT_EXTRA_MISSING
    option, folder = f"--plot {str(file)!r}", file.parent
    if file.is_dir():
        example = str(file / "rosenbrock.png")
        return f"{option} is a folder; give a file name, such as {example!r}"
    if not folder.exists():
        return f"{option}: the folder {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{option}: {str(folder)!r} is not a folder"
    formats = backend_bases.FigureCanvasBase.get_supported_filetypes()
    suffix = file.suffix.lower().removeprefix(".")
    if suffix and suffix not in formats:
        known = ", ".join(f".{name}" for name in sorted(formats))
        return f"{option}: matplotlib cannot write .{suffix} files; use one of {known}"
    # savefig opens the file for writing: an existing file must be writable, else the folder
    # must let a file be created. Opening tests that as savefig will; access() would only predict
    # it, and network file systems can make it wrong. An existing file is opened to append
    # nothing, which leaves it as it was; the folder gets a nameless file, gone when closed.
    try:
        if file.exists():
            with file.open("ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as error:
        if file.exists():
            return f"{option}: cannot overwrite the file ({error.strerror})"
        return f"{option}: cannot create files in the folder {str(folder)!r} ({error.strerror})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs the tour; returns the exit status.

    Args:
      argv: the arguments, without the program name; ``None`` reads ``sys.argv``.

    Returns:
      0 on success, 1 if ``adam_update`` and ``Adam.step`` disagree, 2 if ``--plot`` cannot be
      written (matplotlib missing, no such folder, a folder that cannot be written, a format
      matplotlib does not know), found before any work is done. ``--help`` and usage errors exit
      through ``SystemExit`` as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot is not None:
        problem = plot_file_problem(args.plot)
        if problem is not None:
            print(f"{parser.prog}: error: {problem}", file=sys.stderr)
            return 2

    identical = replay_notebook_example()
    print()
    train_mlp(steps=args.steps, seed=args.seed, lr=args.lr)
    if args.plot is not None:
        paths = plot_rosenbrock(args.plot, steps=args.plot_steps)
        print(f"\n3) Rosenbrock from (-1.5, 2), minimum 0 at (1, 1): {args.plot_steps} steps each")
        width = max(map(len, paths))
        for label, path in paths.items():
            x, y = path[-1]
            print(
                f"   {label:<{width}}  ends at ({x:.4f}, {y:.4f}), f = {rosenbrock(path[-1]):.2e}"
            )
        print(f"paths and loss curves written to {args.plot}")
    return 0 if identical else 1
