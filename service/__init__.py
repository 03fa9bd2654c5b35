"""The image service that runs on the GPU box."""

__version__ = "0.1.0"
