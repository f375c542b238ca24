"""The release of this package, as installed (``0+unknown`` in a source tree never installed)."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("adam-functional")
except PackageNotFoundError:  # Imported from a source tree that was never installed.
    __version__ = "0+unknown"
