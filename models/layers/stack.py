"""Stacked layers: identical layers built with a leading `layers` axis and run with `lax.scan` + remat,
so a 94-layer model compiles as fast as a 2-layer one."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


def build_stacked(num_layers: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """`make` vmapped over `num_layers` split RNG streams; every variable gets the logical axis `layers` first."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(layer_rngs):
        return make(layer_rngs)

    stack = build(rngs)
    for _, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Variable) and var.has_metadata("axes"):
            var.set_metadata("axes", ("layers",) + tuple(var.get_metadata("axes")))
    return stack


def scan_stacked(stack: nnx.Module, carry, step: Callable, xs=None, *, remat: bool = True):
    """carry, ys = scan of `step(layer, carry, x) -> (carry, y)` over the stacked layers (and per-layer xs)."""
    graphdef, state = nnx.split(stack)

    def body(c, layer_state_and_x):
        layer_state, x = layer_state_and_x
        return step(nnx.merge(graphdef, layer_state), c, x)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))
