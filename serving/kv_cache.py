"""Decode caches: one preallocated buffer per cached quantity and scanned segment, [L, B, S, ...].

What is cached per token comes from the model's attention (`CausalLM.cache_spec`): a grouped-query cache
(rotated key and value, [G, K] each) for the Qwen families, a latent cache (latent [C] and rope key [R], nothing
per head) for Kimi K2 / DeepSeek-V3 MLA. Slot b's valid entries are 0 .. length[b] - 1; everything past them is
stale and masked, so freeing a slot costs nothing and a new prefix simply overwrites it.

Letters: L layers of a segment, B decode slots, S cache positions, T prefix length, N inserted rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_cache(model, num_slots: int, max_len: int, dtype) -> list[tuple[jax.Array, ...]]:
    """Zeros for every segment's cached quantities: [L, num_slots, max_len, *per-token shape]."""
    return [tuple(jnp.zeros((layers, num_slots, max_len) + shape, dtype) for shape in shapes)
            for layers, shapes in model.cache_spec()]


def cache_bytes(cache) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))


def insert_prefixes(cache, prefix, rows_N, slots_N):
    """Copy prefix rows `rows_N` (prefix: per segment [L, Bp, T, ...]) into decode slots `slots_N` at positions
    0 .. T-1. A slot index of B (one past the last) marks a padding entry and writes nothing."""
    def put(c, p):
        T = min(p.shape[2], c.shape[2])
        return c.at[:, slots_N, :T].set(p[:, rows_N, :T].astype(c.dtype), mode="drop")

    return jax.tree.map(put, cache, prefix)


def write_tokens(cache, new, index_B):
    """Write each slot's one new entry (per segment [L, B, 1, ...]) at its position index_B[b]; positions past
    the buffer are dropped (a finished slot that keeps computing never writes out of bounds)."""
    B = index_B.shape[0]

    def put(c, n):
        return c.at[:, jnp.arange(B), index_B].set(n[:, :, 0].astype(c.dtype), mode="drop")

    return jax.tree.map(put, cache, new)


def window(cache, size: int):
    """The first `size` positions of every buffer: decode attends to a power-of-two window that covers the
    longest live sequence instead of the whole buffer, so short sequences cost little."""
    return jax.tree.map(lambda c: c[:, :, :size], cache)


def put_window(cache, part):
    """Write a window back in place (the caller donates `cache`)."""
    return jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice(c, p, (0,) * c.ndim), cache, part)
