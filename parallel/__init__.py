"""Meshes, logical-axis rules and sharding helpers. Imports jax only."""

from parallel.axes import DEFAULT_RULES, LOGICAL_AXES, logical_to_spec

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "logical_to_spec"]
