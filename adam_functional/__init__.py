"""Adam as a pure function over immutable records, with a notebook-compatible in-place wrapper.

The core is `adam_update`, which maps ``(params, grads, state, config)`` to
``(new_params, new_state)`` and writes none of its inputs. `Adam` is the stateful shell:
``Adam(lr=0.01).step(W, grads)`` updates ``W`` in place with the same arithmetic.
"""

from adam_functional import checkpoint, schedules
from adam_functional._kernels import backend
from adam_functional._records import AdamConfig, AdamState
from adam_functional._tree import tree_map
from adam_functional._update import adam_init, adam_update
from adam_functional._version import __version__
from adam_functional._wrapper import Adam

__all__ = [
    "Adam",
    "AdamConfig",
    "AdamState",
    "__version__",
    "adam_init",
    "adam_update",
    "backend",
    "checkpoint",
    "schedules",
    "tree_map",
]
