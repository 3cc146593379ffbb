"""Meshes, logical-axis rules, sharding helpers, expert-parallel dispatch, sequence-parallel attention, multi-host
start-up and the ahead-of-time memory planner. Imports jax only."""

from parallel.axes import DEFAULT_RULES, LOGICAL_AXES
from parallel.mesh import MESH_AXES, format_mesh, make_mesh, mesh_shape, parse_mesh
from parallel.sharding import Layout, constrain, context_mesh, spec_for, variable_shardings

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "Layout", "constrain", "context_mesh", "format_mesh",
           "make_mesh", "mesh_shape", "parse_mesh", "spec_for", "variable_shardings"]
