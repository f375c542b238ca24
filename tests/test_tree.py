"""Trees: every container type round-trips, structures are compared with paths in the errors."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest

from adam_functional import _tree, tree_map

Layer = namedtuple("Layer", ["w", "b"])


def _example():
    return {
        "enc": [Layer(np.ones(2), np.zeros(1)), (np.ones(3),)],
        "dec": OrderedDict(z=np.ones(()), a=np.ones(0)),
    }


def test_flatten_order_and_round_trip_keep_types_and_key_order():
    tree = _example()
    leaves, treedef = _tree.flatten(tree, "params")
    assert [leaf.shape for leaf in leaves] == [(2,), (1,), (3,), (), (0,)]
    rebuilt = _tree.unflatten(treedef, leaves)
    assert type(rebuilt["enc"][0]) is Layer
    assert type(rebuilt["enc"][1]) is tuple
    assert type(rebuilt["dec"]) is OrderedDict and list(rebuilt["dec"]) == ["z", "a"]
    assert all(a is b for a, b in zip(_tree.flatten(rebuilt, "x")[0], leaves))


def test_leaf_paths_name_dict_keys_indices_and_fields():
    _, treedef = _tree.flatten(_example(), "grads")
    assert _tree.leaf_paths(treedef, "grads") == [
        "grads['enc'][0].w",
        "grads['enc'][0].b",
        "grads['enc'][1][0]",
        "grads['dec']['z']",
        "grads['dec']['a']",
    ]


def test_flatten_like_accepts_dict_keys_in_any_order():
    _, treedef = _tree.flatten({"a": np.ones(1), "b": np.zeros(1)}, "params")
    leaves = _tree.flatten_like({"b": 2, "a": 1}, treedef, "grads")
    assert leaves == [1, 2]


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            {"enc": [Layer(1, 2)], "dec": {}},
            r"grads\['enc'\]: expected a list of length 2 like params, got length 1",
        ),
        (
            {"enc": [Layer(1, 2), [3]], "dec": {}},
            r"grads\['enc'\]\[1\]: expected a tuple like params, got a list with 1 item",
        ),
        (
            {"enc": [(1, 2), (3,)], "dec": {}},
            r"grads\['enc'\]\[0\]: expected a namedtuple Layer like params, got a tuple",
        ),
        (
            {"enc": [Layer(1, [2]), (3,)], "dec": {}},
            r"grads\['enc'\]\[0\].b: expected an array like params, got a list",
        ),
        (
            {"enc": [Layer(1, 2), (3,)]},
            r"grads: expected the keys of params \['enc', 'dec'\], got \['enc'\] \(missing keys \['dec'\]\)",
        ),
        ({"enc": [Layer(1, 2), (3,)], "dec": {}, "x": 1}, r"unexpected keys \['x'\]"),
        (np.ones(3), r"grads: expected a dict like params, got an array"),
    ],
)
def test_flatten_like_reports_the_first_difference(other, message):
    _, treedef = _tree.flatten(
        {"enc": [Layer(np.ones(1), np.ones(1)), (np.ones(1),)], "dec": {}}, "p"
    )
    with pytest.raises(ValueError, match=message):
        _tree.flatten_like(other, treedef, "grads")


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (
            {"a": 1.0},
            r"params\['a'\]: expected a NumPy array or a dict, list, tuple or namedtuple of them, got float",
        ),
        ([np.ones(1), {1, 2}], r"params\[1\]: expected a NumPy array .* got set"),
        (None, r"params: expected a NumPy array .* got NoneType"),
    ],
)
def test_flatten_rejects_unsupported_nodes(tree, message):
    with pytest.raises(TypeError, match=message):
        _tree.flatten(tree, "params")


def test_tree_map_maps_leaves_with_matching_trees():
    a = {"x": np.ones(2), "y": [np.zeros(1)]}
    b = {"y": [np.ones(1)], "x": np.full(2, 3.0)}
    result = tree_map(lambda p, q: p + q, a, b)
    np.testing.assert_array_equal(result["x"], [4.0, 4.0])
    np.testing.assert_array_equal(result["y"][0], [1.0])
    with pytest.raises(ValueError, match=r"rest\[0\]\['y'\]: expected a list"):
        tree_map(lambda p, q: p, a, {"x": np.ones(2), "y": np.ones(1)})


def test_empty_containers_are_trees_without_leaves():
    leaves, treedef = _tree.flatten({"a": [], "b": ()}, "params")
    assert leaves == []
    assert _tree.unflatten(treedef, []) == {"a": [], "b": ()}
