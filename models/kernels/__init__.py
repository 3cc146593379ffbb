"""Pallas kernels (issue 9)."""
