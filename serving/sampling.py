"""Per-row token choice on device: temperature (0 is greedy), top-k, top-p and seeded keys.

Semantics are those of jtinker's whole-sequence sampler, so swapping samplers is invisible: logits are divided
by the temperature, top-k keeps the k largest (ties with the k-th stay), top-p keeps the smallest prefix of the
sorted distribution whose mass reaches p (the token that crosses p stays), and the reported log-prob of the
chosen token is log-softmax(logits / temperature) before any truncation (the model's own at temperature 1).
Greedy rows take the first arg-max of the raw logits.

Randomness depends only on each row's key and step counter (fold_in(key, step)), never on the batch it shares
or the slot it sits in: a seeded request gives the same tokens alone or under continuous batching.

Letters: B rows, V vocabulary, N top log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def request_key(seed: int, sample_index: int) -> np.ndarray:
    """Raw key data (uint32 [2]) of one sample of a request: fold_in(key(seed), sample_index).

    The seed's key is built from all 64 bits of `seed mod 2**64` (high word, low word), as
    `jax.random.key` does with x64 on, so every seed in [-2**63, 2**64) has its own stream and none overflows
    a C long; seeds in [0, 2**32) keep the keys `jax.random.key` gives them without x64."""
    bits = int(seed) % (1 << 64)
    base = jax.random.wrap_key_data(np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32))
    return np.asarray(jax.random.key_data(jax.random.fold_in(base, sample_index)))


def _truncate(scaled_BV, top_k_B, top_p_B, truncating_B):
    V = scaled_BV.shape[-1]
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
    use_k = (top_k_B > 0) & (top_k_B < V)
    kth = jnp.take_along_axis(sorted_BV, jnp.clip(top_k_B - 1, 0, V - 1)[:, None], axis=-1)
    kth = jnp.where(use_k[:, None], kth, -jnp.inf)
    sorted_BV = jnp.where(sorted_BV < kth, -jnp.inf, sorted_BV)
    probs = jax.nn.softmax(sorted_BV, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p_B[:, None]
    kept = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    cutoff = jnp.take_along_axis(sorted_BV, (kept - 1)[:, None], axis=-1)
    cutoff = jnp.where((top_p_B < 1.0)[:, None], cutoff, -jnp.inf)
    threshold = jnp.maximum(kth, cutoff)
    masked = jnp.where(scaled_BV < threshold, -jnp.inf, scaled_BV)
    return jnp.where(truncating_B[:, None], masked, scaled_BV)


def _first_argmax(x_BV):
    """First index of each row's maximum: a max and a min-index reduction, which XLA CPU vectorizes, instead of
    argmax's (value, index) pair reduction (4x slower on a [32, 8192] decode step)."""
    V = x_BV.shape[-1]
    hit = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1), V - 1)


def sample(logits_BV, temperature_B, top_k_B, top_p_B, key_data_B2, step_B, want_top_B, num_top: int):
    """(token [B], its log-prob [B], top ids [B, N], top log-probs [B, N]) for fp32 logits. The top-N
    log-probs (of the same distribution as the token's) are computed only when some row asks for them, and
    truncation and random draws only when some row needs them (`lax.cond`), so greedy batches pay for neither.
    The log-probs are log_softmax's (shifted by the max, minus the log of the shifted exponentials' sum), with
    the [B, V] log-probs formed only for the top-N."""
    logits_BV = logits_BV.astype(jnp.float32)
    B, V = logits_BV.shape
    greedy_B = temperature_B <= 0
    scaled = logits_BV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    shifted_BV = scaled - jnp.max(scaled, axis=-1, keepdims=True)
    log_sum_B1 = jnp.log(jnp.sum(jnp.exp(shifted_BV), axis=-1, keepdims=True))
    truncating_B = ~greedy_B & (((top_k_B > 0) & (top_k_B < V)) | (top_p_B < 1.0))

    def draw(scaled):
        masked = jax.lax.cond(jnp.any(truncating_B), _truncate, lambda s, *_: s, scaled, top_k_B, top_p_B,
                              truncating_B)
        keys = jax.vmap(lambda kd, step: jax.random.fold_in(jax.random.wrap_key_data(kd), step))(key_data_B2,
                                                                                                 step_B)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)
        return jnp.argmax(masked + gumbel, axis=-1).astype(jnp.int32)

    greedy_tokens = _first_argmax(logits_BV)
    sampled = jax.lax.cond(jnp.all(greedy_B), lambda s: greedy_tokens, draw, scaled)
    token_B = jnp.where(greedy_B, greedy_tokens, sampled)
    logprob_B = (jnp.take_along_axis(shifted_BV, token_B[:, None], axis=-1) - log_sum_B1)[:, 0]
    if num_top:
        top_lp, top_ids = jax.lax.cond(
            jnp.any(want_top_B > 0), lambda s, l: tuple(jax.lax.top_k(s - l, num_top)),
            lambda *_: (jnp.zeros((B, num_top), jnp.float32), jnp.zeros((B, num_top), jnp.int32)), shifted_BV,
            log_sum_B1)
    else:
        top_lp, top_ids = jnp.zeros((B, 0), jnp.float32), jnp.zeros((B, 0), jnp.int32)
    return token_B, logprob_B, top_ids.astype(jnp.int32), top_lp
