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


class LayerNorm(nnx.Module):
    """LayerNorm with bias, computed in fp32 and rounded once (as torch does for bf16 inputs)."""

    def __init__(self, dim: int, eps: float, *, dtype, axes=("norm",)):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=axes)
        self.eps = eps

    def __call__(self, x):
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
