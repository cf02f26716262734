"""stream-runtime: generate and understand video as a live stream."""

__version__ = "0.1.0"
