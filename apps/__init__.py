"""Command line and apps (imported as ``stream_runtime.apps``)."""
