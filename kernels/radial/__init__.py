"""Radial block tables for streaming attention against a sink + window cache."""
