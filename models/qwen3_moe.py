"""Qwen3-MoE decoder (`Qwen3MoeForCausalLM`), also the language model of Qwen3-VL-MoE: grouped-query attention
with q/k norm, softmax top-k MoE, dense layers from `mlp_only_layers` / `decoder_sparse_step`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from models.config import Qwen3MoeConfig
from models.layers.attention import Attention
from models.layers.decoder import REMAT_BUDGET_BYTES, CausalLM, DecoderLayer
from models.layers.mlp import MLP
from models.layers.moe import SparseMoeBlock
from models.layers.moe_impl import MoeImpl, resolve_moe_impl
from models.lora import LoraConfig
from parallel.expert import ExpertParallel


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, cfg: Qwen3MoeConfig, *, lora: LoraConfig | None = None, dtype: str | None = None,
                 rngs: nnx.Rngs | None = None, moe_impl: str | MoeImpl | None = None,
                 expert_parallel: ExpertParallel = ExpertParallel(), remat: bool | str = "auto",
                 remat_budget_bytes: int = REMAT_BUDGET_BYTES):
        """`moe_impl` (default: the config's) is resolved here, once, and recorded in `self.config.moe_impl`."""
        dt = jnp.dtype(dtype or cfg.dtype)
        std = cfg.initializer_range
        impl = resolve_moe_impl(cfg.moe_impl if moe_impl is None else moe_impl, num_experts=cfg.num_experts,
                                hidden_size=cfg.hidden_size, expert_size=cfg.moe_intermediate_size, dtype=dt,
                                quant=cfg.expert_quant, lora=lora)
        cfg = dataclasses.replace(cfg, moe_impl=impl.value)

        def make_layer(rngs: nnx.Rngs, sparse: bool) -> DecoderLayer:
            attn = Attention(hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                             num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                             rms_norm_eps=cfg.rms_norm_eps, use_bias=cfg.attention_bias, dtype=dt, rngs=rngs,
                             lora=lora, std=std)
            if sparse:
                mlp = SparseMoeBlock(hidden_size=cfg.hidden_size, num_experts=cfg.num_experts,
                                     num_experts_per_tok=cfg.num_experts_per_tok,
                                     expert_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                                     dtype=dt, rngs=rngs, lora=lora, std=std, impl=impl,
                                     quant=cfg.expert_quant, expert_parallel=expert_parallel)
            else:
                mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dt, rngs=rngs, lora=lora, std=std)
            return DecoderLayer(attn, mlp, hidden_size=cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dt, sparse=sparse)

        super().__init__(cfg, make_layer, lora=lora, dtype=dt, rngs=rngs if rngs is not None else nnx.Rngs(0),
                         remat=remat, remat_budget_bytes=remat_budget_bytes)
