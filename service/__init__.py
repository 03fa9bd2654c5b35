"""The image service that runs on the GPU box."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdxl-deploy")  # the installed release's own metadata (pyproject.toml's version)
except PackageNotFoundError:  # a source tree on the path that was never installed
    __version__ = "0+unknown"
