"""Least squares with Adam on a dask cluster: the parameters are a chunked dask array.

Run it with ``python examples/dask_cluster.py``. It starts a `distributed.LocalCluster` of two
worker processes on the loopback interface, takes a few Adam steps on a random least-squares
problem whose parameter vector is split into chunks, and prints the loss of each step. Each
`adam_update` only adds tasks to the graph; ``dask.persist`` runs them on the workers and keeps
the new parameters and moments there, chunk by chunk. The same steps on NumPy arrays give the
same parameters, up to the order in which the matrix products add their terms.
"""

from __future__ import annotations

import attrs
import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster

import adam_functional as af

ROWS, COLUMNS, CHUNK, STEPS = 1_000, 200, 50, 10
CONFIG = af.AdamConfig(lr=0.05, nonfinite="skip")  # "skip" decides on the workers, lazily


def gradient(A, b, x):
    """The loss ``mean((A @ x - b) ** 2)`` and its gradient, for NumPy or dask arrays."""
    residual = A @ x - b
    return (residual**2).mean(), A.T @ residual * (2.0 / ROWS)


def persist(x, state):
    """Runs the graphs of ``x`` and ``state`` on the cluster and keeps the results there.

    ``dask.persist`` looks inside lists, tuples and dicts, not inside an `AdamState` (it would
    return the state as it is, its graph still growing step after step): the state's fields are
    persisted as a dict, and the state rebuilt from them.
    """
    x, fields = dask.persist(x, attrs.asdict(state, recurse=False))
    return x, af.AdamState(**fields)


def train_numpy(A, b, x):
    state = af.adam_init(x, CONFIG)
    for _ in range(STEPS):
        _, g = gradient(A, b, x)
        x, state = af.adam_update(x, g, state, CONFIG)
    return x


def main() -> None:
    rng = np.random.default_rng(0)
    A = rng.normal(size=(ROWS, COLUMNS)) / np.sqrt(COLUMNS)
    b = A @ rng.normal(size=COLUMNS) + 0.1 * rng.normal(size=ROWS)
    x0 = np.zeros(COLUMNS)

    with (
        LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        print(f"{len(client.scheduler_info()['workers'])} workers at {cluster.scheduler_address}")
        # Dask uses the client for compute and persist once it exists.
        A_d, b_d, x = dask.persist(
            da.from_array(A, chunks=(ROWS, CHUNK)),
            da.from_array(b, chunks=ROWS),
            da.from_array(x0, chunks=CHUNK),
        )
        state = af.adam_init(x, CONFIG)
        for step in range(1, STEPS + 1):
            loss, g = gradient(A_d, b_d, x)
            x, state = af.adam_update(x, g, state, CONFIG)  # Builds the graph; computes nothing.
            x, state = persist(x, state)
            print(f"step {step}: loss {float(loss.compute()):.6f}")
        trained = x.compute()
        print(f"steps taken: {int(state.t.compute())}, skipped: {int(state.skipped.compute())}")

    expected = train_numpy(A, b, x0)
    np.testing.assert_allclose(trained, expected, rtol=1e-9, atol=1e-12)
    error = np.max(np.abs(trained - expected))
    print(f"matches the same steps on NumPy (largest difference {error:.1e})")


if __name__ == "__main__":
    main()
