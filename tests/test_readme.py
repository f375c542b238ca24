"""Every command README.md shows runs, as written, on a fresh copy of the repository.

The commands are the lines of README's ```` ```bash ```` blocks. Each block runs as one bash
script, which stops at the first command that fails, in a temporary copy of the repository, the
blocks in README's order, so that a later block may use an environment an earlier one created, as
a reader following README would. They install from PyPI, as a reader's would,
and so need it to be reachable; that, the installs and the whole test suite that README's test
command runs make this slow (``-m "not slow"`` leaves it out).

Two things differ from a reader's run, both to keep the run finite:

- The test command (``python -m pytest``) runs every test but this one (``PYTEST_ADDOPTS`` adds
  ``--deselect``), which would start again.
- ``bash .ci/run`` is only parsed (``bash -n``): CI runs that script itself, and this test is
  part of it.

CI runs its first stage, the tests on the NumPy backend, lint, types and the docs build, through
this test: README's commands are those a developer runs. A quick test checks that README keeps
showing them. Inline code in README's prose that reads as a command must also appear in a block,
so that no command README shows goes untested.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _util import fenced_blocks
from test_notebook import NOTEBOOK, NOTEBOOK_ENV

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
THIS_TEST = "tests/test_readme.py::test_readme_commands_run_as_written"

# Commands run in another form, with the reason; each must still appear in README.
NOT_RUN_AS_WRITTEN = {
    "bash .ci/run": (
        "bash -n .ci/run",
        "CI runs this script itself, and this test is part of it: it is only parsed here",
    ),
}
# Marks the lines of the scripts' output that give a command's time.
TIMING = "[time] "
FAILED = "[failed] the command above, exit status "
# pytest's closing line, such as "1180 passed, 68 skipped, 2 xfailed in 61.98s".
PYTEST_SUMMARY = re.compile(r"^=* ?(\d+ (?:passed|failed)\b.* in [0-9.]+s.*?)(?: =*)?$", re.M)
# Inline code that starts like this is a command.
COMMAND_STARTS = ("python ", "python3 ", "pip ", "mkdocs ", "bash ", "ruff ", "mypy", ". ")
# What a copy of the repository leaves out when git cannot list the files.
NOT_COPIED = (
    ".git",
    ".venv",
    "site",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".benchmarks",
)


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """Returns ``(line number of the opening fence, commands)`` for each bash block of ``text``.

    A command is a line of the block without its trailing comment; blank and comment-only lines
    are left out, and a line ending in a backslash continues on the next.
    """
    blocks: list[tuple[int, list[str]]] = []
    for block in fenced_blocks(text):
        if block.info in ("bash", "sh", "shell", "console"):
            source = "\n".join(block.lines).replace("\\\n", " ")
            commands = [_without_comment(line) for line in source.splitlines()]
            blocks.append((block.opening + 1, [command for command in commands if command]))
    return blocks


def _without_comment(line: str) -> str:
    # A '#' starts a comment at the start of a line or after a blank, outside quotes: enough for
    # README's commands, which quote no '#'.
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()


def readme_commands() -> list[str]:
    return [command for _, block in bash_blocks(README.read_text("utf-8")) for command in block]


def inline_commands(text: str) -> list[str]:
    """Inline code spans of the prose (outside fenced blocks) that read as shell commands."""
    prose = re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.DOTALL | re.MULTILINE)
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)
    return [span for span in spans if span.startswith(COMMAND_STARTS)]


def test_bash_blocks_collector() -> None:
    text = textwrap.dedent(
        """\
        # Title

        ```bash
        python3 -m venv .venv && . .venv/bin/activate   # a comment
        # a whole comment line

        pip install \\
            ".[test]"
        ```

        ```python
        print("not bash")
        ```

        ````bash
        echo "```"
        ````
        """
    )
    assert bash_blocks(text) == [
        (3, ["python3 -m venv .venv && . .venv/bin/activate", 'pip install      ".[test]"']),
        (15, ['echo "```"']),
    ]
    with pytest.raises(ValueError, match=r"line 1: the fence '```' is never closed"):
        bash_blocks("```bash\nls\n")


def test_readme_opens_with_a_demo_command_and_a_test_command() -> None:
    """Before its first section, README shows two commands: demo, then tests, each in its own venv."""
    text = README.read_text("utf-8")
    opening = text[: text.index("\n## ")]
    first_line, commands = bash_blocks(opening)[0]
    assert first_line < 10
    assert len(commands) == 2
    demo, tests = commands
    assert "pip install " in demo and "&& python -m adam_functional" in demo
    assert 'pip install ".[test]"' in tests and tests.endswith("python -m pytest")
    environments = [re.findall(r"python3 -m venv (\S+)", command) for command in commands]
    assert len(environments[0]) == len(environments[1]) == 1
    assert environments[0] != environments[1]
    assert f". {environments[0][0]}/bin/activate" in demo
    assert f". {environments[1][0]}/bin/activate" in tests


def test_the_docs_home_page_shows_the_same_two_commands() -> None:
    readme = bash_blocks(README.read_text("utf-8"))[0][1]
    home = bash_blocks((ROOT / "docs" / "index.md").read_text("utf-8"))[0][1]
    assert home == readme


def test_readme_shows_the_plot_command_with_a_file() -> None:
    plots = [
        command for command in readme_commands() if "python -m adam_functional --plot" in command
    ]
    assert plots
    for command in plots:
        # The plot needs matplotlib: the same command installs the [plot] extra first.
        assert re.search(r'pip install "\.\[([\w,]+,)?plot(,[\w,]+)?\]" && ', command), command
        assert re.search(r"--plot [\w.-]+\.png$", command), command


def test_every_command_in_readme_prose_is_in_a_block() -> None:
    """Inline commands are tested through the blocks: each one starts some block's command."""
    segments = [segment.strip() for command in readme_commands() for segment in command.split("&&")]
    missing = [
        inline
        for inline in inline_commands(README.read_text("utf-8"))
        if not any(segment.startswith(inline) for segment in segments)
    ]
    assert not missing, f"commands in README's prose that no block runs: {missing}"


def test_readme_runs_the_checks_ci_relies_on() -> None:
    """CI's tests, lint, types and docs build are README's commands: they must stay there."""
    segments = [segment.strip() for command in readme_commands() for segment in command.split("&&")]
    for check in [
        "python -m pytest",
        "ruff check .",
        "ruff format --check .",
        "mypy",
        "mkdocs build --strict",
    ]:
        assert check in segments, f"README no longer runs {check!r}, which CI relies on"


def test_commands_run_in_another_form_are_still_in_readme() -> None:
    commands = readme_commands()
    for command in NOT_RUN_AS_WRITTEN:
        assert command in commands


def copy_repository(destination: Path) -> None:
    """Copies the working tree's files, as git would list them, or all but build outputs."""
    listed = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        result = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=False,
        )
        if result.returncode == 0:
            listed = [name for name in result.stdout.decode().split("\0") if name]
    if listed is None:
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*NOT_COPIED))
        return
    for name in listed:
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is listed too
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def clean_environment() -> dict[str, str]:
    """This process's environment, less what would tie the commands to its Python."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        and not name.startswith("PYTEST_")
    }
    environment["PYTEST_ADDOPTS"] = f"--deselect {THIS_TEST}"
    # The copy runs the notebook's tests too, where this run can: the notebook is not in the copy.
    if NOTEBOOK.is_file():
        environment[NOTEBOOK_ENV] = str(NOTEBOOK)
    return environment


def block_script(commands: list[str]) -> str:
    """A bash script that runs ``commands`` in order, times each, and stops at the first failure.

    The commands run in one shell as written, so that an ``activate`` holds for the next. Each
    exit status is checked by hand: ``set -e`` would not stop at a failure inside ``a && b && c``
    unless it is the last one.
    """
    script = ["set -uo pipefail"]
    for command in commands:
        script += [
            "started=$SECONDS",
            NOT_RUN_AS_WRITTEN.get(command, (command, ""))[0],
            "status=$?",
            f"printf '%s%d s: %s\\n' {shlex.quote(TIMING)} $((SECONDS - started)) "
            f"{shlex.quote(command)} >&2",
            f'if [ "$status" -ne 0 ]; then echo {shlex.quote(FAILED)}"$status" >&2; '
            'exit "$status"; fi',
        ]
    return "\n".join(script)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_a_block_stops_at_a_failure_anywhere_in_a_command(tmp_path: Path) -> None:
    script = block_script(["echo one", "true && false && echo skipped", "echo never"])
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stdout == "one\n"
    assert f"{FAILED}1" in result.stderr
    assert "s: true && false && echo skipped" in result.stderr


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    repository = tmp_path / "adam_functional"
    copy_repository(repository)
    environment = clean_environment()
    timings = []
    for line, commands in bash_blocks(README.read_text("utf-8")):
        script = block_script(commands)
        started = time.perf_counter()
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=repository,
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        timings.append(f"README.md:{line}: {time.perf_counter() - started:.0f} s in all")
        timings += [
            "    " + entry.removeprefix(TIMING)
            for entry in result.stderr.splitlines()
            if entry.startswith(TIMING)
        ]
        timings += ["    " + summary for summary in re.findall(PYTEST_SUMMARY, result.stdout)]
        output = (result.stdout + result.stderr)[-6000:]
        assert result.returncode == 0, (
            f"README.md line {line}: the block failed (exit status {result.returncode}):\n"
            + "\n".join(commands)
            + f"\n--- its output, last part ---\n{output}"
        )
    # The demo's --plot wrote its figure where README says.
    assert (repository / "rosenbrock.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print("\n".join(timings), file=sys.stderr)
