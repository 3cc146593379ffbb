"""Device meshes with the five jtinker axes, from a config mapping or a CLI string like "data=2,expert=2,tensor=2".

Every mesh has all five axes (absent ones have size 1), so one rules table and one model definition serve every
layout. Axis types are `Auto`: XLA's partitioner places the collectives, and `shard_map` (expert parallelism)
reshards its inputs as it needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor", "sequence")


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """"data=2,expert=2" (or a mapping) -> {axis: size} over all five axes; -1 marks the one axis that takes
    whatever the device count leaves (see `mesh_shape`)."""
    if spec is None or spec == "":
        items: dict = {}
    elif isinstance(spec, Mapping):
        items = dict(spec)
    else:
        items = {}
        for part in str(spec).split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"mesh {spec!r}: expected axis=size pairs separated by commas, found {part!r}")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh {spec!r}: size of {name.strip()!r} is not an integer: {value!r}") from None
    unknown = sorted(set(items) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; expected some of {', '.join(MESH_AXES)}")
    bad = {k: v for k, v in items.items() if v == 0 or v < -1}
    if bad or list(items.values()).count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive (one may be -1), found {items}")
    return {axis: int(items.get(axis, 1)) for axis in MESH_AXES}


def mesh_shape(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Sizes for exactly `num_devices` devices: a -1 axis takes the rest; with none, an unspecified mesh is all
    `data` and any other must multiply to `num_devices`."""
    shape = parse_mesh(spec)
    fixed = math.prod(v for v in shape.values() if v != -1)
    if -1 in shape.values():
        if num_devices % fixed:
            raise ValueError(f"mesh {spec!r}: {num_devices} devices are not a multiple of {fixed}")
        shape = {k: (num_devices // fixed if v == -1 else v) for k, v in shape.items()}
    elif fixed == 1 and num_devices > 1 and not spec:
        shape["data"] = num_devices
    elif fixed != num_devices:
        raise ValueError(f"mesh {format_mesh(shape)} has {fixed} devices, but {num_devices} are in use")
    return shape


def format_mesh(shape: Mapping[str, int]) -> str:
    """The CLI form, axes of size 1 left out ("data=1" for a single device)."""
    parts = [f"{k}={v}" for k, v in shape.items() if v != 1]
    return ",".join(parts) or "data=1"


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the five jtinker axes, `expert` and `tensor` innermost so
    their collectives stay between neighbouring devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    sizes = tuple(shape[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 5)


def mesh_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """Number of shards along one mesh axis or a tuple of them (1 for None)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)
