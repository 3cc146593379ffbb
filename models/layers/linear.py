"""Linear layer with a frozen kernel [in, out] and an optional multi-adapter LoRA delta."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.lora import LoRA, LoraConfig


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, in_axis: str, out_axis: str, dtype, rngs: nnx.Rngs,
                 std: float = 0.02, use_bias: bool = False, lora: LoraConfig | None = None, group: str = "mlp"):
        self.kernel = nnx.Param(normal_init(rngs, (in_features, out_features), dtype, std), axes=(in_axis, out_axis))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), axes=(out_axis,)) if use_bias else None
        self.lora = (LoRA(in_features, out_features, lora, group, in_axis=in_axis, out_axis=out_axis)
                     if lora is not None and lora.enabled(group) else None)

    def __call__(self, x_BTD, adapter_ids_B=None):
        y = jnp.einsum("BTD,DF->BTF", x_BTD, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora is not None and adapter_ids_B is not None:
            y = y + self.lora(x_BTD, adapter_ids_B)
        return y
