import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Every core where pytest-xdist (of the ``[test]`` extra) is installed, unless ``-n`` says
    otherwise; one process where it is not, rather than an error over an unknown option."""
    if hasattr(config, "workerinput"):  # A worker of such a run: it runs its share.
        return
    if config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None) is None:
        config.option.numprocesses = "auto"
