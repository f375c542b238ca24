"""Old files keep loading: committed pickles and checkpoints resume, newer ones refuse.

The files in tests/fixtures/ were written by tests/fixtures/make_fixtures.py (see its docstring)
with a past release: the pickles and the checkpoint files of format version 1 by release 0.1.0,
those of format version 2 (in fixtures/format2/) by the release that introduced it. Each test
loads one way of saving a run and resumes it with the stored gradients. Every way of saving must
load the same state bit for bit, and so resume to the same parameters bit for bit; those agree
with the parameters 0.1.0 stored to rounding, since 0.2 folds the bias corrections into per-step
scalars (docs/algorithm.md), which rounds otherwise. A change that breaks one of these breaks the
checkpoints of users of that release in the same way: fix the change, never the fixture.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import attrs
import numpy as np
import pytest

from adam_functional import Adam, AdamConfig, AdamState, adam_update, checkpoint, schedules
from adam_functional._records import PICKLE_VERSION, _unpickle

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The checkpoint files of each format version: 1 as release 0.1.0 wrote them, 2 in safetensors.
CHECKPOINTS = [FIXTURES, FIXTURES / "format2"]


def _fixture(name):
    return FIXTURES / name


@pytest.fixture(params=CHECKPOINTS, ids=["format1", "format2"])
def checkpoints(request):
    """The folder of the checkpoint files of one format version."""
    return request.param


def _load_pickle(name):
    if int(np.__version__.split(".")[0]) < 2:
        # The fixtures were pickled with NumPy 2, whose arrays pickle by `numpy._core` names.
        pytest.skip("the pickle fixtures were written with NumPy 2 and need it to load")
    return pickle.loads(_fixture(name).read_bytes())


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for key in tree for leaf in _leaves(tree[key])]
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _assert_bits(got, expected):
    got_leaves, expected_leaves = _leaves(got), _leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for a, b in zip(got_leaves, expected_leaves):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), "the same numbers, bit for bit"


# How far a resume may be from 0.1.0's stored parameters: the four steps' rounding, in units of
# the parameters' precision (the updates are at most lr = 0.05 each).
_ULPS = 64


def _assert_resumed(got, expected):
    """The stored 0.1.0 parameters, to the rounding of the steps (see the module docstring)."""
    got_leaves, expected_leaves = _leaves(got), _leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for a, b in zip(got_leaves, expected_leaves):
        assert a.dtype == b.dtype and a.shape == b.shape
        eps = float(np.finfo(a.dtype).eps)
        np.testing.assert_allclose(a, b, rtol=_ULPS * eps, atol=_ULPS * eps)


def _resumes_of(results):
    """Asserts that every way of saving resumes to the same numbers; returns them."""
    first, *others = results
    for other in others:
        _assert_bits(other, first)
    return first


@pytest.fixture
def grads(checkpoints):
    return checkpoint.load(checkpoints / "grads.ckpt", kind="tree")


def _resume_pure(params, state, config, grads):
    for g in grads:
        params, state = adam_update(params, g, state, config)
    return params


def test_the_fixtures_are_small():
    assert sum(path.stat().st_size for path in FIXTURES.rglob("*") if path.is_file()) < 200_000


def test_both_formats_hold_the_same_numbers():
    for name in ["params", "grads", "expected_pure", "expected_adam", "adam_params"]:
        old, new = (checkpoint.load(folder / f"{name}.ckpt") for folder in CHECKPOINTS)
        _assert_bits(new, old)
    for name in ["state", "config"]:
        old, new = (checkpoint.load(folder / f"{name}.ckpt") for folder in CHECKPOINTS)
        assert new == old


def _pickled_pure_run(grads):
    params = _load_pickle("params.pkl")
    state = _load_pickle("state.pkl")
    config = _load_pickle("config.pkl")
    assert type(state) is AdamState and state.t == 5 and state.v_max is not None
    assert type(config) is AdamConfig and type(config.lr) is schedules.Join and config.amsgrad
    return _resume_pure(params, state, config, grads)


def _checkpointed_pure_run(grads, checkpoints):
    params = checkpoint.load(checkpoints / "params.ckpt", kind="tree")
    state = checkpoint.load(checkpoints / "state.ckpt", kind="AdamState", like=params)
    config = checkpoint.load(checkpoints / "config.ckpt", kind="AdamConfig")
    assert state == _load_pickle("state.pkl") and config == _load_pickle("config.pkl")
    return _resume_pure(params, state, config, grads)


def _pickled_adam_run(grads):
    params, opt = _load_pickle("adam.pkl")
    assert type(opt) is Adam and opt.t[id(params["enc"][0][0])] == 5
    for g in grads:
        opt.step(params, g)
    return params


def _checkpointed_adam_run(grads, checkpoints):
    params = checkpoint.load(checkpoints / "adam_params.ckpt", kind="tree")
    opt = Adam()
    opt.load_state_dict(checkpoint.load(checkpoints / "adam_state_dict.ckpt", kind="state_dict"))
    _, pickled = _load_pickle("adam.pkl")
    assert opt.config == pickled.config
    for g in grads:
        opt.step(params, g)
    return params


def test_the_pure_run_resumes_the_same_from_pickles_and_checkpoints(grads, checkpoints):
    final = _resumes_of([_pickled_pure_run(grads), _checkpointed_pure_run(grads, checkpoints)])
    _assert_resumed(final, checkpoint.load(checkpoints / "expected_pure.ckpt"))


def test_the_adam_resumes_the_same_from_its_pickle_and_its_state_dict(grads, checkpoints):
    final = _resumes_of([_pickled_adam_run(grads), _checkpointed_adam_run(grads, checkpoints)])
    _assert_resumed(final, checkpoint.load(checkpoints / "expected_adam.ckpt"))


def test_the_resume_tolerance_tells_a_wrong_step_from_rounding(grads, checkpoints):
    # One step more than stored is far outside the tolerance: the comparison above has teeth.
    params = _checkpointed_adam_run(grads, checkpoints)
    stepped = _checkpointed_adam_run([*grads, grads[-1]], checkpoints)
    with pytest.raises(AssertionError):
        _assert_resumed(stepped, params)


def test_every_node_type_of_the_format_still_reads_the_same(checkpoints):
    got = checkpoint.load(checkpoints / "every_node.ckpt")
    assert type(got) is OrderedDict and list(got) == ["arrays", "scalars", "numpy", "pair"]
    arrays = got["arrays"]
    assert arrays[0].dtype == np.int16 and arrays[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert arrays[1].dtype == np.bool_ and arrays[1].shape == () and bool(arrays[1])
    assert arrays[2].dtype == np.float64 and arrays[2].shape == (0,)
    none, true, big, tenth, negative_zero, inf, text = got["scalars"]
    assert type(got["scalars"]) is tuple
    assert none is None and true is True and big == -(2**70) and type(big) is int
    assert tenth == 0.1 and math.copysign(1.0, negative_zero) == -1.0 and inf == math.inf
    assert text == "ünï"
    numpy = got["numpy"]
    assert type(numpy) is dict and list(numpy) == ["f16", "c64", 7]
    assert type(numpy["f16"]) is np.float16 and numpy["f16"] == 1.5
    assert type(numpy["c64"]) is np.complex64 and numpy["c64"] == 1 - 2j
    assert type(numpy[7]) is np.uint8 and numpy[7] == 255
    pair = got["pair"]
    assert type(pair).__name__ == "Pair" and type(pair)._fields == ("left", "right")
    assert pair.left.dtype == np.float32 and pair.left[0] == 1.0 and np.isnan(pair.left[1])
    assert pair.right == {}


# -------------------------------------------------------------------------------------------------
# Pickles from a newer release are refused with a clear error.


class _FromANewerRelease:
    """Pickles like a record written by a release with a newer pickle format version."""

    def __init__(self, cls, fields, version=PICKLE_VERSION + 1):
        self.cls, self.fields, self.version = cls, fields, version

    def __reduce__(self):
        return (_unpickle, (self.cls, self.version, self.fields))


def _fields_of(obj):
    function, (cls, version, fields) = obj.__reduce__()
    assert function is _unpickle and version == PICKLE_VERSION and cls is type(obj)
    return fields


def _records():
    state = _load_pickle("state.pkl")
    config = _load_pickle("config.pkl")
    _, opt = _load_pickle("adam.pkl")
    return [state, config, opt]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["AdamState", "AdamConfig", "Adam"])
def test_a_pickle_from_a_newer_release_is_refused(index):
    record = _records()[index]
    name = type(record).__name__
    payload = pickle.dumps(_FromANewerRelease(type(record), _fields_of(record)), protocol=4)
    with pytest.raises(
        ValueError,
        match=rf"^cannot unpickle {name}: expected format version <= {PICKLE_VERSION}, got "
        rf"{PICKLE_VERSION + 1}; it was written by a newer adam_functional, upgrade to read it$",
    ):
        pickle.loads(payload)
    # The same fields at this release's version load: only the version was refused.
    same = pickle.loads(pickle.dumps(_FromANewerRelease(type(record), _fields_of(record), 1)))
    assert type(same) is type(record)


def test_a_newer_pickle_inside_a_tree_is_refused_before_anything_is_used():
    _, opt = _load_pickle("adam.pkl")
    payload = pickle.dumps(
        {"params": np.ones(2), "opt": _FromANewerRelease(Adam, _fields_of(opt), 7)}, protocol=4
    )
    with pytest.raises(ValueError, match=r"^cannot unpickle Adam: .* got 7; it was written by a"):
        pickle.loads(payload)


@pytest.mark.parametrize("version", ["1", 1.0, None])
def test_a_pickle_version_that_is_not_an_int_is_refused(version):
    config = AdamConfig()
    payload = pickle.dumps(
        _FromANewerRelease(AdamConfig, attrs.asdict(config, recurse=False), version)
    )
    with pytest.raises(ValueError, match=rf"^cannot unpickle AdamConfig: .* got {version!r};"):
        pickle.loads(payload)
