"""The decoder skeleton shared by every family: embeddings, pre-norm residual layers grouped into scanned
segments, final norm, (optionally tied) unembedding with LoRA.

A family supplies its config (with `layer_kinds()`, `rope`, `rope_dim`) and a `make_layer(rngs, kind)`;
consecutive layers of one kind form a segment whose layers are stacked and scanned.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers.attention import attention_mask
from models.layers.linear import Linear, normal_init
from models.layers.norm import RMSNorm
from models.layers.rope import inv_freq_and_attention_factor, rope_cos_sin
from models.layers.stack import build_stacked, scan_stacked
from models.lora import LoRA, LoraConfig
from parallel.sharding import constrain


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)). An MoE `mlp` returns (output, chosen experts)."""

    def __init__(self, self_attn: nnx.Module, mlp: nnx.Module, *, hidden_size: int, eps: float, dtype,
                 sparse: bool):
        self.input_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.mlp = mlp
        self.sparse = sparse

    def __call__(self, x_BTD, cos, sin, mask_BTS, adapter_ids_B, replay_experts_Nk=None, layer_index=None):
        """`layer_index`: this layer's place in its stack, for the routed experts' whole (unsliced) weights."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, mask_BTS, adapter_ids_B)
        h = self.post_attention_layernorm(x_BTD)
        if self.sparse:
            h, experts_Nk = self.mlp(h, adapter_ids_B, replay_experts_Nk, layer_index=layer_index)
            return x_BTD + h, experts_Nk
        return x_BTD + self.mlp(h, adapter_ids_B), None

    def cached(self, x_BTD, cos, sin, mask_BTS, adapter_ids_B, cache=None, layer_index=None):
        """The layer for decoding: also returns the new tokens' cache entries (see `Attention.cached`)."""
        attn, new = self.self_attn.cached(self.input_layernorm(x_BTD), cos, sin, mask_BTS, adapter_ids_B, cache)
        x_BTD = x_BTD + attn
        h = self.post_attention_layernorm(x_BTD)
        h = self.mlp(h, adapter_ids_B, layer_index=layer_index)[0] if self.sparse else self.mlp(h, adapter_ids_B)
        return x_BTD + h, new


def layer_segments(kinds: list[bool], boundaries=()) -> list[tuple[int, int, bool]]:
    """(first layer, number of layers, sparse) for each run of identical layers; a run also ends before every
    layer index in `boundaries` (e.g. where DeepStack injection stops)."""
    segments: list[tuple[int, int, bool]] = []
    for layer, sparse in enumerate(kinds):
        if segments and segments[-1][2] == sparse and layer not in boundaries:
            first, count, _ = segments[-1]
            segments[-1] = (first, count + 1, sparse)
        else:
            segments.append((layer, 1, sparse))
    return segments


REMAT_BUDGET_BYTES = 2 << 30  # the default activation budget: a model argument (`remat_budget_bytes`), not a global


def remat_layers(remat: bool | str, cfg, batch: int, length: int, itemsize: int, budget_bytes: int) -> bool:
    """Whether to rematerialise each layer in the backward pass. "auto" keeps the layers' activations when their
    estimate (residual stream, q/k/v, attention scores and probabilities, routed expert hidden states) stays
    under `budget_bytes` (the model's `remat_budget_bytes`, 2 GiB by default): recomputing costs a third more
    FLOPs, so small models and short sequences skip it, while a full-size model at training lengths is far over
    any budget and rematerialises."""
    if remat != "auto":
        return bool(remat)
    width, heads = cfg.hidden_size, cfg.num_attention_heads
    routed = getattr(cfg, "num_experts_per_tok", 1) * (getattr(cfg, "moe_intermediate_size", 0) or
                                                        getattr(cfg, "intermediate_size", width))
    per_token = 12 * width + 2 * heads * length + 6 * routed
    return cfg.num_hidden_layers * batch * length * per_token * itemsize > budget_bytes


class CausalLM(nnx.Module):
    def __init__(self, cfg, make_layer: Callable[[nnx.Rngs, bool], DecoderLayer], *, lora: LoraConfig | None,
                 dtype, rngs: nnx.Rngs, remat: bool | str, remat_budget_bytes: int = REMAT_BUDGET_BYTES):
        self.config, self.dtype, self.remat = cfg, dtype, remat
        self.remat_budget_bytes = remat_budget_bytes
        self.embed_tokens = nnx.Param(
            normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, cfg.initializer_range), axes=("vocab", "embed"))
        self.segment_layout = tuple(layer_segments(cfg.layer_kinds(), getattr(cfg, "segment_boundaries", ())))
        self.segments = nnx.List([build_stacked(count, lambda r, s=sparse: make_layer(r, s), rngs)
                                  for _, count, sparse in self.segment_layout])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
            self.lm_head_lora = (LoRA(cfg.hidden_size, cfg.vocab_size, lora, "unembed", in_axis="embed",
                                      out_axis="vocab") if lora is not None and lora.unembed else None)
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, in_axis="embed", out_axis="vocab", dtype=dtype,
                                  rngs=rngs, std=cfg.initializer_range, lora=lora, group="unembed")
            self.lm_head_lora = None

    def embed(self, input_ids_BT):
        return jnp.take(self.embed_tokens[...], input_ids_BT, axis=0).astype(self.dtype)

    def hidden_states(self, input_ids_BT, *, attention_mask_BT=None, positions_BT=None, adapter_ids_B=None,
                      replay_experts=None, inputs_embeds=None, deepstack=None):
        """Final-norm hidden states [B, T, D] and the routed experts of every MoE layer [L_moe, B*T, k].

        `attention_mask_BT` marks real tokens (1) and padding (0); `positions_BT` defaults to 0..T-1 (pass the
        cumulative count of real tokens for left padding; [3, B, T] for M-RoPE); `adapter_ids_B` picks each
        sequence's LoRA slot; `replay_experts` [L_moe, B*T, k] replays an earlier expert choice (routing
        replay). Multimodal callers pass `inputs_embeds` and `deepstack = (flat token index [Nv], features
        [n, Nv, D])`, added after each of the first n layers at those tokens.
        """
        cfg = self.config
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x = self.embed(input_ids_BT) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        x = constrain(x, ("batch", "length", None))  # sequence parallelism: tokens split over `sequence`
        inv_freq, attention_factor = inv_freq_and_attention_factor(cfg.rope, cfg.rope_dim, cfg.max_position_embeddings)
        cos, sin = rope_cos_sin(positions_BT, inv_freq, attention_factor, self.dtype,
                                mrope_section=cfg.rope.mrope_section if positions_BT.ndim == 3 else None)
        mask_BTS = attention_mask(attention_mask_BT, T)
        remat = remat_layers(self.remat, cfg, B, T, jnp.dtype(self.dtype).itemsize, self.remat_budget_bytes)

        routed, moe_layers_done = [], 0
        for stack, (first, count, sparse) in zip(self.segments, self.segment_layout):
            replay = None
            if sparse and replay_experts is not None:
                replay = replay_experts[moe_layers_done:moe_layers_done + count]
                moe_layers_done += count
            extra = None
            if deepstack is not None and first < deepstack[1].shape[0]:
                extra = deepstack[1][first:first + count]  # segments end where injection ends

            def step(layer, h, xs, index):
                replay_Nk, features = xs
                h, experts = layer(h, cos, sin, mask_BTS, adapter_ids_B, replay_Nk, layer_index=index)
                h = constrain(h, ("batch", "length", None))
                if features is not None:
                    h = h.reshape(B * T, -1).at[deepstack[0]].add(features.astype(h.dtype), mode="drop").reshape(h.shape)
                return h, experts

            x, experts = scan_stacked(stack, x, step, (replay, extra), remat=remat)
            if experts is not None:
                routed.append(experts)
        routed = jnp.concatenate(routed, axis=0) if routed else None
        return self.norm(x), routed

    def cache_spec(self) -> list[tuple[int, tuple[tuple[int, ...], ...]]]:
        """Per segment: (layers, per-token shapes of the attention's cache entries), for `serving.kv_cache`."""
        return [(count, stack.self_attn.cache_spec()) for stack, (_, count, _) in
                zip(self.segments, self.segment_layout)]

    def forward_cached(self, input_ids_BT, *, positions_BT, mask_BTS, adapter_ids_B=None, cache=None,
                       inputs_embeds=None, deepstack=None):
        """Final-norm hidden states [B, T, D] of T new tokens and their cache entries, per segment a tuple of
        [L, B, T, ...] arrays. Without `cache` this is the prefill (the training forward's numerics, `mask_BTS`
        [B, T, T]); with `cache` (per segment a tuple of [L, B, S, ...]) the new tokens also attend to the S
        cached ones, `mask_BTS` [B, T, S + T] saying which cached entries are valid. The caller writes the
        returned entries into its cache, so one layer scan serves both and no cache is copied per layer.
        `positions_BT` may be [3, B, T] (M-RoPE); `inputs_embeds` / `deepstack` as in `hidden_states`."""
        cfg = self.config
        B, T = input_ids_BT.shape
        x = self.embed(input_ids_BT) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        inv_freq, attention_factor = inv_freq_and_attention_factor(cfg.rope, cfg.rope_dim, cfg.max_position_embeddings)
        cos, sin = rope_cos_sin(positions_BT, inv_freq, attention_factor, self.dtype,
                                mrope_section=cfg.rope.mrope_section if positions_BT.ndim == 3 else None)
        new_entries = []
        for i, (stack, (first, count, _)) in enumerate(zip(self.segments, self.segment_layout)):
            extra = None
            if deepstack is not None and first < deepstack[1].shape[0]:
                extra = deepstack[1][first:first + count]

            def step(layer, h, xs, index):
                layer_cache, features = xs
                h, new = layer.cached(h, cos, sin, mask_BTS, adapter_ids_B, layer_cache, layer_index=index)
                if features is not None:
                    h = h.reshape(B * T, -1).at[deepstack[0]].add(features.astype(h.dtype), mode="drop").reshape(h.shape)
                return h, new

            x, new = scan_stacked(stack, x, step, (None if cache is None else cache[i], extra), remat=False)
            new_entries.append(new)
        return self.norm(x), new_entries

    def logits(self, h_BTD, adapter_ids_B=None):
        if self.lm_head is not None:
            return self.lm_head(h_BTD, adapter_ids_B)
        out = jnp.einsum("BTD,VD->BTV", h_BTD, self.embed_tokens[...])
        if self.lm_head_lora is not None and adapter_ids_B is not None:
            out = out + self.lm_head_lora(h_BTD, adapter_ids_B)
        return out

    def target_logprobs(self, h_BTD, targets_BTK, adapter_ids_B=None, chunk_size: int = 8192):
        """log p(target) [B, T, K] for K target ids per position, without materialising [B, T, V] logits.

        One pass over vocabulary chunks keeps a running max and sum of exponentials (online log-sum-exp) and
        picks the target logits on the way; each chunk is rematerialised in the backward pass when the logits
        would not fit (see `remat_budget_bytes`), so memory is O(B*T*chunk). The last chunk is shifted back to end
        at V and its overlap masked, so no weight copy is padded."""
        V = self.config.vocab_size
        C = min(chunk_size, V)
        n_chunks = -(-V // C)
        if self.lm_head is not None:
            weight, weight_axis = self.lm_head.kernel[...], 1  # [D, V]
            lora = self.lm_head.lora
        else:
            weight, weight_axis = self.embed_tokens[...], 0  # tied: [V, D]
            lora = self.lm_head_lora
        h_A = None
        if lora is not None and adapter_ids_B is not None:
            h_A = jnp.einsum("BTD,BDR->BTR", h_BTD, lora.lora_a[...][adapter_ids_B].astype(h_BTD.dtype))
            h_A = (h_A.astype(jnp.float32) * lora.lora_scale[...][adapter_ids_B][:, None, None]).astype(h_BTD.dtype)
        targets = targets_BTK.astype(jnp.int32)

        def chunk(carry, i):
            running_max, running_sum, picked = carry
            start = jnp.minimum(i * C, V - C)
            w = jax.lax.dynamic_slice_in_dim(weight, start, C, axis=weight_axis)
            spec = "BTD,DC->BTC" if weight_axis == 1 else "BTD,CD->BTC"
            logits = jnp.einsum(spec, h_BTD, w)
            if h_A is not None:
                b = jax.lax.dynamic_slice_in_dim(lora.lora_b[...], start, C, axis=2)[adapter_ids_B]
                logits = logits + jnp.einsum("BTR,BRC->BTC", h_A, b.astype(h_BTD.dtype))
            column = start + jnp.arange(C)
            logits = jnp.where(column >= i * C, logits.astype(jnp.float32), -jnp.inf)  # overlap already counted
            new_max = jnp.maximum(running_max, logits.max(axis=-1))
            running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(
                logits - new_max[..., None]).sum(axis=-1)
            offset = targets - start
            inside = (targets >= i * C) & (offset < C)
            value = jnp.take_along_axis(logits, jnp.clip(offset, 0, C - 1), axis=-1)
            return (new_max, running_sum, jnp.where(inside, value, picked)), None

        B, T = h_BTD.shape[:2]
        if n_chunks == 1 and B * T * V * 4 <= self.remat_budget_bytes // 4:
            # The whole vocabulary at once and the logits fit: a plain log-softmax, without the chunk loop's
            # masking and running-max passes over the logits (each a full pass through memory on CPU).
            logits = jnp.einsum("BTD,DV->BTV" if weight_axis == 1 else "BTD,VD->BTV", h_BTD, weight)
            if h_A is not None:
                logits = logits + jnp.einsum("BTR,BRV->BTV", h_A, lora.lora_b[...][adapter_ids_B].astype(h_BTD.dtype))
            logits = logits.astype(jnp.float32)
            picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, V - 1), axis=-1)
            return picked - jax.nn.logsumexp(logits, axis=-1)[..., None]
        init = (jnp.full((B, T), -jnp.inf, jnp.float32), jnp.zeros((B, T), jnp.float32),
                jnp.zeros(targets.shape, jnp.float32))
        # Rematerialise each chunk's logits in the backward pass unless all of them fit a quarter of the budget.
        if B * T * V * 4 > self.remat_budget_bytes // 4:
            chunk = jax.checkpoint(chunk, prevent_cse=False)
        (running_max, running_sum, picked), _ = jax.lax.scan(chunk, init, jnp.arange(n_chunks))
        return picked - (running_max + jnp.log(running_sum))[..., None]

    def __call__(self, input_ids_BT, *, attention_mask_BT=None, positions_BT=None, adapter_ids_B=None):
        h, _ = self.hidden_states(input_ids_BT, attention_mask_BT=attention_mask_BT, positions_BT=positions_BT,
                                  adapter_ids_B=adapter_ids_B)
        return self.logits(h, adapter_ids_B)
