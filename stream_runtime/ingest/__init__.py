"""Streaming ingest: sources, exact keyframe-parallel decode, frame sampling."""
