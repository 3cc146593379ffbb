"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.linear import Linear
from models.lora import LoraConfig


def silu(x):
    """SiLU evaluated in fp32 and rounded once, as torch does for bf16 (XLA would round the sigmoid too)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype, rngs: nnx.Rngs, lora: LoraConfig | None,
                 std: float = 0.02):
        kw = dict(dtype=dtype, rngs=rngs, std=std, lora=lora, group="mlp")
        self.gate_proj = Linear(hidden_size, intermediate_size, in_axis="embed", out_axis="mlp", **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, in_axis="embed", out_axis="mlp", **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, in_axis="mlp", out_axis="embed", **kw)

    def __call__(self, x_BTD, adapter_ids_B=None):
        h = silu(self.gate_proj(x_BTD, adapter_ids_B)) * self.up_proj(x_BTD, adapter_ids_B)
        return self.down_proj(h, adapter_ids_B)
