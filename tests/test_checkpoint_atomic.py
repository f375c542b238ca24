"""checkpoint.save is atomic: the path holds the previous file or the new one, whole, always."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from adam_functional import checkpoint


def test_save_writes_exactly_the_path_given(tmp_path):
    for name in ["plain", "with.npz", "with.npy", "with.pkl", "dots.in.name", "ünï"]:
        checkpoint.save(tmp_path / name, {"x": np.ones(2)})
        checkpoint.save(str(tmp_path / name), {"x": np.ones(2)})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["plain", "with.npz", "with.npy", "with.pkl", "dots.in.name", "ünï"])


def test_save_replaces_a_file_and_keeps_its_permission_bits(tmp_path):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, np.ones(2))
    os.chmod(path, 0o640)
    checkpoint.save(path, np.zeros(3))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    np.testing.assert_array_equal(checkpoint.load(path), np.zeros(3))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the umask from /proc")
def test_a_new_file_gets_the_mode_open_would_give(tmp_path):
    umask = os.umask(0o027)
    try:
        checkpoint.save(tmp_path / "c.ckpt", np.ones(2))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "c.ckpt").st_mode) == 0o640


@pytest.mark.parametrize("failing", ["fsync", "replace", "write"])
def test_a_failed_save_removes_its_temporary_file_and_keeps_the_old_one(
    tmp_path, monkeypatch, failing
):
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, np.arange(3.0))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "write":
        monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    else:
        monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(path, np.zeros(5))
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_an_interrupted_save_removes_its_temporary_file(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "c.ckpt", np.zeros(5))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------
# Saves killed, saves beside readers.


_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from adam_functional import checkpoint

    path, size, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    while True:
        version += 1
        checkpoint.save(path, {"version": version, "w": np.full(size, float(version)),
                               "b": np.full(1000, version, np.int64)})
        print(version, flush=True)
    """
)


def _state_of(version, size):
    return {
        "version": version,
        "w": np.full(size, float(version)),
        "b": np.full(1000, version, np.int64),
    }


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_at_any_moment_leaves_the_previous_checkpoint_whole(tmp_path):
    size = 3_000_000  # 24 MB of float64: a save takes long enough to be killed in the middle.
    path = tmp_path / "run.ckpt"
    checkpoint.save(path, _state_of(0, size))
    rng = random.Random(0)
    loaded, interrupted, deadline = 0, 0, time.monotonic() + 10.0
    kills = 0
    while kills < 8 and time.monotonic() < deadline:
        child = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(size), str(loaded)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += 1
        finished = [int(line) for line in child.stdout.read().split()]
        child.stdout.close()
        reported = finished[-1] if finished else loaded
        back = checkpoint.load(path)
        # The path holds the last save reported complete, or the one after it when the kill
        # came between the rename and the report; either way whole, with its own numbers.
        assert back["version"] in (reported, reported + 1)
        np.testing.assert_array_equal(back["w"], np.full(size, float(back["version"])))
        np.testing.assert_array_equal(back["b"], np.full(1000, back["version"], np.int64))
        loaded = back["version"]
        others = [p.name for p in tmp_path.iterdir() if p != path]
        assert all(
            name.startswith(".adam_functional-checkpoint-") and name.endswith(".tmp")
            for name in others
        ), others
        assert path.name not in others
        interrupted += bool(others)
        for name in others:  # As documented: temporary folders are safe to delete between saves.
            shutil.rmtree(tmp_path / name)
    assert kills >= 5
    # The saver spends nearly all its time saving: some kills land in the middle of a save.
    assert interrupted >= 1


def test_readers_never_see_a_partial_file_while_another_thread_saves(tmp_path):
    path = tmp_path / "shared.ckpt"
    size = 200_000
    checkpoint.save(path, _state_of(0, size))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for version in range(1, 40):
                checkpoint.save(path, _state_of(version, size))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not stop.is_set():
        back = checkpoint.load(path)
        assert np.all(back["w"] == back["version"]) and np.all(back["b"] == back["version"])
        seen.append(back["version"])
    thread.join()
    assert not errors and seen == sorted(seen)
    assert checkpoint.load(path)["version"] == 39
