"""Logical axes -> NamedShardings for parameters, optimizer state and activations.

A layout is (mesh, rules). Model code learns the mesh from JAX's own context: a step traced under
`jax.set_mesh(mesh)` sees it through `context_mesh()`, and then constrains activations by logical axes
(`constrain`) and runs routed experts expert-parallel. Without a mesh, or on a mesh of one device, both are
no-ops and the single-device program is unchanged.

Works on anything that looks like an NNX variable (`get_metadata("axes")`, `get_value()`) without importing
Flax, so `parallel/` depends on jax alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.axes import DEFAULT_RULES

Rules = Mapping[str, "str | tuple[str, ...] | None"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical-axis rules that place parameters, optimizer state and batches on it."""

    mesh: Mesh
    rules: Rules = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def spec(self, shape: Sequence[int], axes: Sequence[str | None]) -> PartitionSpec:
        return spec_for(shape, axes, self.mesh, self.rules)

    def sharding(self, shape: Sequence[int], axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(shape, axes))

    def size(self, logical: str) -> int:
        """Shards along the mesh axes a logical axis maps to (on this mesh)."""
        return _prod(self.mesh, mesh_axes_of(logical, self.rules, self.mesh))


def context_mesh():
    """The mesh this code is traced under (`jax.set_mesh`), as an AbstractMesh, when it spans more than one
    device; None without one or on a mesh of one device (the single-device program)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def _prod(mesh: Mesh, axes: Sequence[str]) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def mesh_axes_of(logical: str | None, rules: Rules, mesh: Mesh | None = None) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to (those present in `mesh` with size > 1, when given)."""
    if logical is None:
        return ()
    if logical not in rules:
        raise ValueError(f"logical axis {logical!r} has no sharding rule; known: {sorted(rules)}")
    target = rules[logical]
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(n for n in names if mesh is None or (n in mesh.shape and mesh.shape[n] > 1))


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES
             ) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` with logical `axes`: each dimension takes the mesh axes of its rule,
    in order, while they divide it and were not used by an earlier dimension. Dropping what does not divide
    (instead of failing) lets tiny test models and odd head counts run on any mesh: they are replicated there."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in length")
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, axes):
        kept, n = [], 1
        for a in mesh_axes_of(name, rules, mesh):
            if a not in used and dim % (n * mesh.shape[a]) == 0:
                kept.append(a)
                n *= mesh.shape[a]
        used.update(kept)
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*out)


def _is_variable(x) -> bool:
    return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def variable_axes(var) -> tuple:
    axes = var.get_metadata("axes") if var.has_metadata("axes") else None
    shape = var.get_value().shape
    return tuple(axes) if axes is not None else (None,) * len(shape)


def variable_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """The same tree with every variable replaced by the NamedSharding its `axes` metadata asks for (variables
    without metadata are replicated). Usable as `device_put` target or jit in/out shardings of that tree."""
    def one(var):
        return NamedSharding(mesh, spec_for(var.get_value().shape, variable_axes(var), mesh, rules))
    return jax.tree.map(one, tree, is_leaf=_is_variable)


def constrain(x, axes: Sequence[str | None], rules: Rules = DEFAULT_RULES):
    """`with_sharding_constraint` by logical axes on the context mesh; the identity without one."""
    mesh = context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(x.shape, axes, mesh, rules))


def per_device_bytes(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array with this sharding (exact for evenly divided dimensions)."""
    import numpy as np

    shard = sharding.shard_shape(tuple(shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(dtype).itemsize
