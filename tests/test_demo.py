"""``python -m adam_functional``: the tour runs, agrees with the notebook and trains."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

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
    # The printed digits read back to the exact floats, so == checks every bit: the two APIs
    # agree bit for bit, and the notebook's own arithmetic (three divisions where the package
    # folds the bias corrections into one) to rounding.
    np.testing.assert_array_equal(pure, in_place, strict=True)
    np.testing.assert_allclose(pure, np.stack(notebook_weights()), rtol=1e-14, atol=1e-16)

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


def assert_one_error_line(err: str, *fragments: str) -> None:
    """``err`` is one line in argparse's style that contains every fragment."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("python -m adam_functional: error: --plot ")
    for fragment in fragments:
        assert fragment in err


def test_plot_without_matplotlib_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    file = tmp_path / "trajectories.png"
    assert main(["--plot", str(file)]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, "needs matplotlib", EXTRA_HINT)
    assert captured.out == ""  # it fails before doing any work
    assert not file.exists()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing/rosenbrock.png", "the folder '{tmp}/missing' does not exist"),
        ("folder", "'{tmp}/folder' is a folder; give a file name, such as "),
        ("file.txt/rosenbrock.png", "'{tmp}/file.txt' is not a folder"),
        ("rosenbrock.xyz", "matplotlib cannot write .xyz files; use one of "),
    ],
    ids=["missing-folder", "a-folder", "a-file-as-folder", "unknown-format"],
)
def test_a_plot_file_that_cannot_be_written_fails_before_any_work(
    name: str, expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not a folder\n")
    before = sorted(tmp_path.rglob("*"))
    assert main(["--plot", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_error_line(captured.err, expected.format(tmp=tmp_path))
    assert sorted(tmp_path.rglob("*")) == before


def test_a_folder_that_refuses_new_files_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise PermissionError(errno.EACCES, "Permission denied")

    # Root may write anywhere, so the refusal is simulated where the check creates its probe.
    monkeypatch.setattr(_demo.tempfile, "TemporaryFile", refuse)
    assert main(["--plot", str(tmp_path / "rosenbrock.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_error_line(
        captured.err, f"cannot create files in the folder '{tmp_path}' (Permission denied)"
    )


def test_an_existing_file_that_cannot_be_overwritten_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    file = tmp_path / "rosenbrock.png"
    file.write_bytes(b"kept")

    def refuse(self: Path, *args: object, **kwargs: object) -> NoReturn:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)
    assert main(["--plot", str(file)]) == 2
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_error_line(captured.err, "cannot overwrite the file (Permission denied)")
    assert file.read_bytes() == b"kept"


def test_an_existing_writable_file_passes_the_check_unchanged(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    file = tmp_path / "rosenbrock.png"
    file.write_bytes(b"kept")
    assert _demo.plot_file_problem(file) is None
    assert file.read_bytes() == b"kept"
    assert sorted(tmp_path.iterdir()) == [file]


@pytest.mark.slow
def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    file = tmp_path / "trajectories.png"
    assert main(["--steps", "20", "--plot", str(file), "--plot-steps", "200"]) == 0
    assert file.read_bytes()[:8] == PNG_SIGNATURE
    out = capsys.readouterr().out
    assert out.endswith(f"paths and loss curves written to {file}\n")
    for label in _demo.rosenbrock_configs(200):
        assert re.search(
            rf"^   {re.escape(label)} +ends at \(-?[0-9.]+, -?[0-9.]+\), f = ", out, re.M
        )


def test_adamw_ends_nearer_the_origin_than_adam_as_the_caption_says() -> None:
    """The figure's caption explains AdamW's end point by its decay towards (0, 0)."""
    start = np.array([-1.5, 2.0])
    paths = {
        label: _demo.minimize(_demo.rosenbrock_grad, start, config, 1000)
        for label, config in _demo.rosenbrock_configs(1000).items()
    }
    ends = {label.split(" ")[0]: path[-1] for label, path in paths.items()}
    minimum = np.array([1.0, 1.0])
    np.testing.assert_allclose(ends["Adam"], minimum, atol=0.05)
    assert np.linalg.norm(ends["AdamW"]) < np.linalg.norm(ends["Adam"]) - 0.3
    assert np.linalg.norm(ends["AdamW"] - minimum) > 0.3
    assert all(len(path) == 1001 for path in paths.values())


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


def test_python_dash_m_plot_into_a_missing_folder(tmp_path: Path) -> None:
    """The command line a reader types: one line on stderr, exit status 2, nothing else."""
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, "-m", "adam_functional", "--plot", "plots/rosenbrock.png"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "python -m adam_functional: error: --plot 'plots/rosenbrock.png': "
        "the folder 'plots' does not exist\n"
    )


DEMO_PAGE = Path(__file__).resolve().parent.parent / "docs" / "demo.md"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?")


def text_blocks(page: str) -> list[str]:
    return re.findall(r"^```text\n(.*?)^```$", page, flags=re.DOTALL | re.MULTILINE)


def test_demo_page_lists_every_option_and_default() -> None:
    page = DEMO_PAGE.read_text(encoding="utf-8")
    parser = _demo.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        row = next(
            line for line in page.splitlines() if line.startswith(f"| `{action.option_strings[0]} ")
        )
        if action.default is not None:
            assert f"default: {action.default}" in row, row


@pytest.mark.slow
def test_demo_page_shows_what_the_demo_prints(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transcript on the docs page is the demo's output: same text, same numbers.

    The numbers are compared to a relative 1e-4, so that a platform whose matrix products round
    differently in the last bits still matches.
    """
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(["--plot", "rosenbrock.png"]) == 0
    printed = capsys.readouterr().out
    shown = text_blocks(DEMO_PAGE.read_text(encoding="utf-8"))[0]
    assert NUMBER.sub("#", shown) == NUMBER.sub("#", printed)
    for documented, actual in zip(NUMBER.findall(shown), NUMBER.findall(printed), strict=True):
        assert float(documented.rstrip("%")) == pytest.approx(float(actual.rstrip("%")), rel=1e-4)


def test_demo_page_shows_the_error_the_demo_prints(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    command, error = text_blocks(DEMO_PAGE.read_text(encoding="utf-8"))[1].splitlines()
    assert command == "$ python -m adam_functional --plot plots/rosenbrock.png"
    assert main(command.split()[4:]) == 2
    assert capsys.readouterr().err == error + "\n"
