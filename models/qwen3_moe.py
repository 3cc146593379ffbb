"""Qwen3-MoE decoder (`Qwen3MoeForCausalLM`), also the language model of Qwen3-VL-MoE.

Consecutive layers of the same kind (MoE or dense, from `mlp_only_layers` / `decoder_sparse_step`) form a
segment whose layers are stacked and scanned; a model with no dense layers is a single segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import Qwen3MoeConfig
from models.layers.attention import Attention, attention_mask
from models.layers.linear import Linear, normal_init
from models.layers.mlp import MLP
from models.layers.moe import SparseMoeBlock
from models.layers.norm import RMSNorm
from models.layers.rope import inv_freq_and_attention_factor, rope_cos_sin
from models.layers.stack import build_stacked, scan_stacked
from models.lora import LoRA, LoraConfig


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3MoeConfig, sparse: bool, *, dtype, rngs: nnx.Rngs, lora: LoraConfig | None,
                 moe_impl: str):
        std = cfg.initializer_range
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                                   num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                   rms_norm_eps=cfg.rms_norm_eps, use_bias=cfg.attention_bias, dtype=dtype,
                                   rngs=rngs, lora=lora, std=std)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if sparse:
            self.mlp = SparseMoeBlock(hidden_size=cfg.hidden_size, num_experts=cfg.num_experts,
                                      num_experts_per_tok=cfg.num_experts_per_tok,
                                      expert_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                                      dtype=dtype, rngs=rngs, lora=lora, std=std, impl=moe_impl)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs, lora=lora, std=std)
        self.sparse = sparse

    def __call__(self, x_BTD, cos, sin, mask_BTS, adapter_ids_B, replay_experts_Nk=None):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, mask_BTS, adapter_ids_B)
        h = self.post_attention_layernorm(x_BTD)
        if self.sparse:
            h, experts_Nk = self.mlp(h, adapter_ids_B, replay_experts_Nk)
            return x_BTD + h, experts_Nk
        return x_BTD + self.mlp(h, adapter_ids_B), None


def layer_segments(cfg: Qwen3MoeConfig) -> list[tuple[int, int, bool]]:
    """(first layer, number of layers, sparse) for each run of identical layers."""
    segments: list[tuple[int, int, bool]] = []
    for layer in range(cfg.num_hidden_layers):
        sparse = cfg.is_sparse_layer(layer)
        if segments and segments[-1][2] == sparse:
            first, count, _ = segments[-1]
            segments[-1] = (first, count + 1, sparse)
        else:
            segments.append((layer, 1, sparse))
    return segments


class Qwen3MoeForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen3MoeConfig, *, lora: LoraConfig | None = None, dtype: str | None = None,
                 rngs: nnx.Rngs | None = None, moe_impl: str = "auto", remat: bool = True):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = jnp.dtype(dtype or cfg.dtype)
        self.config, self.dtype, self.remat = cfg, dt, remat
        self.embed_tokens = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), dt, cfg.initializer_range),
                                      axes=("vocab", "embed"))
        self.segment_layout = tuple(layer_segments(cfg))
        self.segments = nnx.List([
            build_stacked(count, lambda r, s=sparse: DecoderLayer(cfg, s, dtype=dt, rngs=r, lora=lora,
                                                                  moe_impl=moe_impl), rngs)
            for _, count, sparse in self.segment_layout])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dt)
        if cfg.tie_word_embeddings:
            self.lm_head = None
            self.lm_head_lora = (LoRA(cfg.hidden_size, cfg.vocab_size, lora, "unembed", in_axis="embed",
                                      out_axis="vocab") if lora is not None and lora.unembed else None)
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, in_axis="embed", out_axis="vocab", dtype=dt,
                                  rngs=rngs, std=cfg.initializer_range, lora=lora, group="unembed")
            self.lm_head_lora = None

    def hidden_states(self, input_ids_BT, *, attention_mask_BT=None, positions_BT=None, adapter_ids_B=None,
                      replay_experts=None):
        """Final-norm hidden states [B, T, D] and the routed experts of every MoE layer [L_moe, B*T, k].

        `attention_mask_BT` marks real tokens (1) and padding (0); `positions_BT` defaults to 0..T-1 (pass the
        cumulative count of real tokens for left padding); `adapter_ids_B` picks each sequence's LoRA slot;
        `replay_experts` [L_moe, B*T, k] replays an earlier expert choice (routing replay).
        """
        cfg = self.config
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        x = jnp.take(self.embed_tokens[...], input_ids_BT, axis=0).astype(self.dtype)
        inv_freq, attention_factor = inv_freq_and_attention_factor(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        cos, sin = rope_cos_sin(positions_BT, inv_freq, attention_factor, self.dtype)
        mask_BTS = attention_mask(attention_mask_BT, T)

        routed, moe_layers_done = [], 0
        for stack, (_, count, sparse) in zip(self.segments, self.segment_layout):
            replay = None
            if sparse and replay_experts is not None:
                replay = replay_experts[moe_layers_done:moe_layers_done + count]
                moe_layers_done += count

            def step(layer, h, replay_Nk):
                return layer(h, cos, sin, mask_BTS, adapter_ids_B, replay_Nk)

            x, experts = scan_stacked(stack, x, step, replay, remat=self.remat)
            if experts is not None:
                routed.append(experts)
        routed = jnp.concatenate(routed, axis=0) if routed else None
        return self.norm(x), routed

    def logits(self, h_BTD, adapter_ids_B=None):
        if self.lm_head is not None:
            return self.lm_head(h_BTD, adapter_ids_B)
        out = jnp.einsum("BTD,VD->BTV", h_BTD, self.embed_tokens[...])
        if self.lm_head_lora is not None and adapter_ids_B is not None:
            out = out + self.lm_head_lora(h_BTD, adapter_ids_B)
        return out

    def __call__(self, input_ids_BT, *, attention_mask_BT=None, positions_BT=None, adapter_ids_B=None):
        h, _ = self.hidden_states(input_ids_BT, attention_mask_BT=attention_mask_BT, positions_BT=positions_BT,
                                  adapter_ids_B=adapter_ids_B)
        return self.logits(h, adapter_ids_B)
