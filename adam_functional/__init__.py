"""Adam as a pure function over immutable records, with a notebook-compatible in-place wrapper.

The core is `adam_update`, which maps ``(params, grads, state, config)`` to
``(new_params, new_state)`` and writes none of its inputs. `Adam` is the stateful shell:
``Adam(lr=0.01).step(W, grads)`` updates ``W`` in place with the same arithmetic.
"""

from adam_functional import checkpoint, kernels, schedules
from adam_functional._clipping import clip_by_global_norm, global_norm
from adam_functional._records import AdamConfig, AdamState, ConfigTree
from adam_functional._tree import ArrayTree, tree_map
from adam_functional._update import adam_init, adam_update
from adam_functional._version import __version__
from adam_functional._wrapper import Adam
from adam_functional.kernels import backend

__all__ = [
    "Adam",
    "AdamConfig",
    "AdamState",
    "ArrayTree",
    "ConfigTree",
    "__version__",
    "adam_init",
    "adam_update",
    "backend",
    "checkpoint",
    "clip_by_global_norm",
    "global_norm",
    "kernels",
    "schedules",
    "tree_map",
]
