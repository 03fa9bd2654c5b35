"""sdxl-deploy: move a self-hosted SD1.5 image API to SDXL safely, and keep checking it."""

from service import __version__

__all__ = ["__version__"]
