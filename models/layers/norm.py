"""RMSNorm with transformers' dtype placement: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x, weight, eps: float):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight * h.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, axes=("norm",)):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
