"""Benchmark of one Adam step: ``python -m adam_functional.bench``; see ``--help``.

For every implementation, size and dtype it measures the time of one optimizer step with fixed
gradients (the model is not part of the measurement), its first call, and the peak memory it
allocates on top of what the step has to return. ``docs/benchmarks.md`` tells how to run it and
read it, with results. The modules:

- ``notebook``: the seed notebook's ``Adam`` class, verbatim: the baseline (``NotebookAdam``).
- ``sizes``: the sizes (single arrays and an MLP-shaped tree), their parameters and gradients.
- ``implementations``: the implementations timed (the notebook, ``adam_update``, ``Adam.step``,
  torch, optax), each set up on one size and dtype.
- ``measure``: timing (interleaved repetitions, medians) and peak memory (tracemalloc).
- ``report``: the header, the progress while it runs, the table, the JSON and the plot.
- ``cli``: the options and ``main``.
"""

from adam_functional.bench.cli import main
from adam_functional.bench.implementations import IMPLEMENTATIONS
from adam_functional.bench.notebook import Adam as NotebookAdam

__all__ = [
    "IMPLEMENTATIONS",
    "NotebookAdam",
    "main",
]
