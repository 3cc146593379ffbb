"""Grouped-query attention with q/k RMSNorm (Qwen3), causal and padding masks, fp32 softmax.

Letters: B batch, T query tokens, S key tokens, D width, H query heads, G key/value heads, K head dim,
and Q = H / G query heads per key/value head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.linear import Linear
from models.layers.norm import RMSNorm
from models.layers.rope import apply_rope
from models.lora import LoraConfig
from parallel.sharding import constrain, context_mesh


def attention_mask(valid_BS, num_queries: int):
    """Causal mask [B, T, S] for T queries that are the last T of S positions, with key padding."""
    S = valid_BS.shape[1]
    q_pos = jnp.arange(S - num_queries, S)
    causal_TS = q_pos[:, None] >= jnp.arange(S)[None, :]
    return causal_TS[None] & valid_BS[:, None, :].astype(bool)


CAUSAL_QUERY_BLOCKS = 4  # at most this many query blocks (each a separate subgraph, so compile grows with it)


def dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, scale: float, causal: bool = False):
    """Softmax attention as transformers' eager path: scores in the activation dtype, masked with the dtype's
    minimum (not -inf, so fully masked rows stay finite), softmax in fp32, cast back.

    `causal`: the caller guarantees that queries and keys are the same positions and `mask_BTS` allows no key
    after its query (training, prefill). The queries are then split into up to CAUSAL_QUERY_BLOCKS blocks, each
    attending only to the keys up to its end: with 4 blocks that skips 3/8 of the scores and their softmax
    passes, which on CPU are bound by memory traffic. The skipped keys are exactly the masked ones, whose
    probabilities underflow to 0, so the result is the same."""
    T = q_BTHK.shape[1]
    blocks = CAUSAL_QUERY_BLOCKS
    if not causal or T < 64 * blocks or T % blocks or T != k_BSGK.shape[1] or context_mesh() is not None:
        return _attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, scale)
    size = T // blocks
    outs = [_attention(q_BTHK[:, i * size:(i + 1) * size], k_BSGK[:, :(i + 1) * size], v_BSGK[:, :(i + 1) * size],
                       mask_BTS[:, i * size:(i + 1) * size, :(i + 1) * size], scale) for i in range(blocks)]
    return jnp.concatenate(outs, axis=1)


def _attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, scale: float):
    B, T, H, K = q_BTHK.shape
    # Sequence parallelism by gathered keys/values: queries stay split over `sequence` (and heads over `tensor`),
    # every shard sees all keys and values. No-ops without a mesh of several devices.
    q_BTHK = constrain(q_BTHK, ("batch", "length", "heads", None))
    k_BSGK = constrain(k_BSGK, ("batch", None, "kv_heads", None))
    v_BSGK = constrain(v_BSGK, ("batch", None, "kv_heads", None))
    G, V = k_BSGK.shape[2], v_BSGK.shape[3]
    q_BTGQK = q_BTHK.reshape(B, T, G, H // G, K)
    dtype = q_BTHK.dtype
    scores = jnp.einsum("BTGQK,BSGK->BGQTS", q_BTGQK, k_BSGK)
    scores = (scores.astype(jnp.float32) * scale).astype(dtype)  # torch scales by an fp32 scalar, then rounds
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    out_BTGQK = jnp.einsum("BGQTS,BSGK->BTGQK", probs, v_BSGK)
    return out_BTGQK.reshape(B, T, H, V)


class Attention(nnx.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rms_norm_eps: float,
                 use_bias: bool, dtype, rngs: nnx.Rngs, lora: LoraConfig | None, std: float = 0.02):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        proj = dict(dtype=dtype, rngs=rngs, std=std, use_bias=use_bias, lora=lora, group="attn")
        self.q_proj = Linear(hidden_size, num_heads * head_dim, in_axis="embed", out_axis="heads", **proj)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, in_axis="embed", out_axis="kv_heads", **proj)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, in_axis="embed", out_axis="kv_heads", **proj)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, in_axis="heads", out_axis="embed", **proj)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps, dtype=dtype, axes=("head_dim",))
        self.k_norm = RMSNorm(head_dim, rms_norm_eps, dtype=dtype, axes=("head_dim",))

    def __call__(self, x_BTD, cos_BTK, sin_BTK, mask_BTS, adapter_ids_B=None):
        return self.cached(x_BTD, cos_BTK, sin_BTK, mask_BTS, adapter_ids_B)[0]

    def cache_spec(self) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of what a decode cache keeps: the rotated key and the value [G, K]."""
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    def cached(self, x_BTD, cos_BTK, sin_BTK, mask_BTS, adapter_ids_B=None, cache=None):
        """Attention of T new tokens that also see S cached ones (`cache` = (k, v) [B, S, G, K], `mask_BTS`
        then [B, T, S + T]); returns the output and the new tokens' (k, v) [B, T, G, K] for the cache. The
        cached keys are concatenated in front, so decoding runs the same attention function as training."""
        B, T, _ = x_BTD.shape
        K = self.head_dim
        q = self.q_norm(self.q_proj(x_BTD, adapter_ids_B).reshape(B, T, self.num_heads, K))
        k = self.k_norm(self.k_proj(x_BTD, adapter_ids_B).reshape(B, T, self.num_kv_heads, K))
        v = self.v_proj(x_BTD, adapter_ids_B).reshape(B, T, self.num_kv_heads, K)
        q, k = apply_rope(q, cos_BTK, sin_BTK), apply_rope(k, cos_BTK, sin_BTK)
        new = (k, v)
        if cache is not None:
            k = jnp.concatenate([cache[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([cache[1].astype(v.dtype), v], axis=1)
        out = dot_product_attention(q, k, v, mask_BTS, K**-0.5, causal=cache is None)
        return self.o_proj(out.reshape(B, T, self.num_heads * K), adapter_ids_B), new
