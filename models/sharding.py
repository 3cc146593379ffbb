"""Placing a model on a mesh: every variable's `axes` metadata through the rules to a NamedSharding."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from parallel.axes import DEFAULT_RULES
from parallel.sharding import variable_shardings


def model_shardings(model_or_state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings with the structure of `nnx.state(model)` (or of the given state)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return variable_shardings(state, mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES):
    """Move the model's variables onto `mesh` as the rules say, in place; returns the state's shardings."""
    state = nnx.state(model)
    shardings = variable_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return shardings
