"""``python -m adam_functional.bench``: runs the benchmark; see ``--help``."""

from adam_functional.bench.cli import main

raise SystemExit(main())
