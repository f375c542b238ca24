"""``python -m adam_functional``: the tour runs, agrees with the notebook and trains."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adam_functional import Adam, _demo
from adam_functional._demo import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXTRA_HINT = 'pip install "adam-functional[plot]"'
ROW = re.compile(r"^\s+(\d+)?\s+\[([^\]]+)\]\s+\[([^\]]+)\]$")


def notebook_weights(steps: int = 5) -> list[np.ndarray]:
    """The seed notebook's example, written out as the notebook computes it."""
    rng = np.random.RandomState(42)  # the stream of np.random.seed(42)
    w, g = rng.randn(2, 2), rng.randn(2, 2)
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    m, v = np.zeros_like(w), np.zeros_like(w)
    history = []
    for t in range(1, steps + 1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * (g**2)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append(w)
    return history


def replay_rows(out: str) -> tuple[np.ndarray, np.ndarray]:
    """The weights printed by the replay, as (steps, 2, 2) arrays: pure, then in place."""
    section = out.split("1) ", 1)[1].split("identical:", 1)[0]
    pure, in_place = [], []
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            pure.append([float(x) for x in match[2].split()])
            in_place.append([float(x) for x in match[3].split()])
    return np.array(pure).reshape(-1, 2, 2), np.array(in_place).reshape(-1, 2, 2)


def losses(out: str) -> tuple[float, float]:
    match = re.search(r"first loss ([0-9.]+), last loss ([0-9.]+)", out)
    assert match, out
    return float(match[1]), float(match[2])


def test_default_run_replays_the_notebook_and_trains(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out

    assert "identical: True" in out
    pure, in_place = replay_rows(out)
    # The printed digits read back to the exact floats, so == checks every bit.
    np.testing.assert_array_equal(pure, in_place, strict=True)
    np.testing.assert_array_equal(pure, np.stack(notebook_weights()), strict=True)

    first, last = losses(out)
    assert last < first / 10
    assert re.search(r"step +500 +loss [0-9.]+ +accuracy +\d+\.\d%", out)


def test_replay_reports_a_disagreement(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class OffByOneBit(Adam):
        def step(self, params: Any, grads: Any) -> None:
            super().step(params, grads)
            np.nextafter(params, np.inf, out=params)

    monkeypatch.setattr(_demo, "Adam", OffByOneBit)
    assert main(["--steps", "2"]) == 1
    assert "identical: False" in capsys.readouterr().out


def test_steps_option_and_live_progress_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["--steps", "30", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "\r   step 30  loss" in out
    assert "30 steps of adam_update" in out
    first, last = losses(out)
    assert last < first


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--steps", "--lr", "--seed", "--plot", "--plot-steps"]:
        assert option in out
    assert EXTRA_HINT in " ".join(out.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--steps", "x"],
        ["--lr", "-1"],
        ["--lr", "nan"],
        ["--plot-steps", "9"],
        ["--seed", "-1"],
        ["--unknown"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    file = tmp_path / "trajectories.png"
    assert main(["--plot", str(file)]) == 2
    captured = capsys.readouterr()
    assert EXTRA_HINT in captured.err
    assert captured.out == ""  # it fails before doing any work
    assert not file.exists()


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    file = tmp_path / "trajectories.png"
    assert main(["--steps", "20", "--plot", str(file), "--plot-steps", "200"]) == 0
    assert file.read_bytes()[:8] == PNG_SIGNATURE
    assert str(file) in capsys.readouterr().out


def test_python_dash_m_help(tmp_path: Path) -> None:
    # From an empty folder, so that it runs the installed package, not a source tree in the cwd.
    result = subprocess.run(
        [sys.executable, "-m", "adam_functional", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m adam_functional")
    assert "--plot" in result.stdout
