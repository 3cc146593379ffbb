"""Stacked layers: identical layers built with a leading `layers` axis and run with `lax.scan` + remat,
so a 94-layer model compiles as fast as a 2-layer one.

Scanning slices every stacked variable per layer, and a slice that feeds a loop is a copy. For the routed
experts, read block by block inside a loop, that copy is a full pass over the layer's expert weights (on CPU it
cost a decode step as much as its matmuls). Variables created with `scan_whole=True` metadata are therefore
not sliced: the layer sees all layers' values, and the step gets the layer's index as an argument, which it
passes down to what reads its own layer in place (`RoutedExperts(..., layer_index=)`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
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
    """carry, ys = scan of `step(layer, carry, x, index) -> (carry, y)` over the stacked layers (and per-layer
    xs); `index` is the layer's position in the stack (int32), for the variables left whole."""
    graphdef, whole, state = nnx.split(stack, _scanned_whole, ...)
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def body(c, args):
        layer_state, x, index = args
        return step(nnx.merge(graphdef, whole, layer_state), c, x, index)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs, jnp.arange(num_layers, dtype=jnp.int32)))


def _scanned_whole(path, value) -> bool:
    return isinstance(value, nnx.Variable) and value.has_metadata("scan_whole") and value.get_metadata("scan_whole")
