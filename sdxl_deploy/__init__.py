"""sdxl-deploy: move a self-hosted SD1.5 image API to SDXL safely, and keep checking it."""

__version__ = "0.1.0"
