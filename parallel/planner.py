"""Ahead-of-time memory planning: compile a step for a mesh without running it (or having its devices) and read
per-device memory from the compiled program.

On a CPU host, a mesh of N virtual devices (`--xla_force_host_platform_device_count=N`, set before JAX starts)
lets XLA partition the real program exactly as it would for N accelerators; `compiled.memory_analysis()` then
gives the per-device argument, output, alias and temporary bytes of that partitioned program. Temporaries are
activations, rematerialised recomputation, gathered FSDP weights and collective buffers together.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

GB = 10**9

# The CPU host compiles bf16 dots by widening their operands to f32, and two passes then move those converts
# onto whole stacked weights outside the layer loop (an f32 copy of every expert weight of every layer at once),
# which no accelerator does; they are switched off so the memory read is the accelerator's. LLVM's optimisation
# level does not change buffer assignment, only compile time.
PLAN_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,convert-mover",
                         "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def parse_bytes(text: str | int | float) -> int:
    """"141GB", "80G", "96GiB", "1.5TB" or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for unit, scale in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[:-len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (expected e.g. 141GB or 96GiB)") from None


def shard_bytes(tree) -> int:
    """Per-device bytes of a tree of arrays or ShapeDtypeStructs carrying shardings (largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(tuple(leaf.shape)) if getattr(leaf, "sharding", None) else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class CompiledMemory:
    """Per-device bytes of one compiled program."""
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        """Live at once at worst: inputs, outputs not written over inputs, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_memory(fn: Callable, args: Sequence, *, in_shardings=None, out_shardings=None,
                   donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = (),
                   compiler_options: dict | None = None) -> CompiledMemory:
    """Lower and compile `fn` for abstract `args` (ShapeDtypeStructs, with shardings) and read its memory."""
    start = time.perf_counter()
    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    jitted = jax.jit(fn, donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums), **kwargs)
    compiled = jitted.lower(*args).compile(PLAN_COMPILER_OPTIONS if compiler_options is None else compiler_options)
    stats = compiled.memory_analysis()
    return CompiledMemory(arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                          aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
                          code=int(stats.generated_code_size_in_bytes),
                          compile_seconds=round(time.perf_counter() - start, 2))
