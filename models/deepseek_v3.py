"""DeepSeek-V3 architecture, which Kimi K2 uses unchanged (`DeepseekV3ForCausalLM`).

Multi-head latent attention (MLA): keys and values are up-projected per head from a small latent c (width C,
with its own RMSNorm, eps fixed at 1e-6) plus one decoupled rope key shared by all heads. For decoding, only
c and the rope key need caching: `latent_kv` gives them and `attend_latent` attends from them directly with
the key/value up-projections absorbed into the query and the output.

Letters: B batch, T query tokens, S key tokens, D width, H heads, C latent width, K (nope) head dim,
R rope head dim (not a LoRA rank here), V value head dim, Q query down-projection width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import DeepseekV3Config
from models.layers.attention import dot_product_attention
from models.layers.decoder import REMAT_BUDGET_BYTES, CausalLM, DecoderLayer
from models.layers.linear import Linear, normal_init
from models.layers.mlp import MLP
from models.layers.moe import RoutedExperts, sigmoid_group_topk_router
from models.layers.moe_impl import MoeImpl, resolve_moe_impl
from models.layers.norm import RMSNorm
from models.layers.rope import apply_rope, apply_rope_interleaved
from models.lora import LoraConfig
from parallel.expert import ExpertParallel

MLA_NORM_EPS = 1e-6  # transformers hard-codes this for q_a_layernorm / kv_a_layernorm


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, cfg: DeepseekV3Config, *, dtype, rngs: nnx.Rngs, lora: LoraConfig | None):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads, self.kv_lora_rank = H, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rope_interleave, self.scale = cfg.rope_interleave, cfg.softmax_scale
        kw = dict(dtype=dtype, rngs=rngs, std=cfg.initializer_range, lora=lora, group="attn")
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * qk, in_axis="embed", out_axis="heads", **kw)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(D, cfg.q_lora_rank, in_axis="embed", out_axis="q_lora",
                                   use_bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, MLA_NORM_EPS, dtype=dtype, axes=("q_lora",))
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, in_axis="q_lora", out_axis="heads", **kw)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, in_axis="embed",
                                         out_axis="kv_lora", use_bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, MLA_NORM_EPS, dtype=dtype, axes=("kv_lora",))
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), in_axis="kv_lora",
                                out_axis="heads", **kw)
        self.o_proj = Linear(H * cfg.v_head_dim, D, in_axis="heads", out_axis="embed", use_bias=cfg.attention_bias,
                             **kw)

    def _rope(self, x, cos, sin):
        return apply_rope_interleaved(x, cos, sin) if self.rope_interleave else apply_rope(x, cos, sin)

    def queries(self, x_BTD, cos, sin, adapter_ids_B):
        """Per-head query parts: q_nope [B, T, H, K] and rotated q_rope [B, T, H, R]."""
        B, T, _ = x_BTD.shape
        if self.q_proj is not None:
            q = self.q_proj(x_BTD, adapter_ids_B)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD, adapter_ids_B)), adapter_ids_B)
        q = q.reshape(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        return q[..., :self.nope_dim], self._rope(q[..., self.nope_dim:], cos, sin)

    def latent_kv(self, x_BTD, cos, sin, adapter_ids_B=None):
        """What a decode cache holds per token: the normalised latent c [B, T, C] and the rotated rope key
        [B, T, R] (one head, shared by all)."""
        compressed = self.kv_a_proj_with_mqa(x_BTD, adapter_ids_B)
        latent_BTC = self.kv_a_layernorm(compressed[..., :self.kv_lora_rank])
        k_rope = self._rope(compressed[..., None, self.kv_lora_rank:], cos, sin)[:, :, 0]
        return latent_BTC, k_rope

    def _kv_up(self, latent_BSC, adapter_ids_B):
        B, S, _ = latent_BSC.shape
        kv = self.kv_b_proj(latent_BSC, adapter_ids_B).reshape(B, S, self.num_heads, self.nope_dim + self.v_dim)
        return kv[..., :self.nope_dim], kv[..., self.nope_dim:]

    def __call__(self, x_BTD, cos, sin, mask_BTS, adapter_ids_B=None):
        latent_BTC, k_rope_BTR = self.latent_kv(x_BTD, cos, sin, adapter_ids_B)
        return self._attend_expanded(x_BTD, cos, sin, latent_BTC, k_rope_BTR, mask_BTS, adapter_ids_B)

    def cache_spec(self) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of what a decode cache keeps: the latent [C] and the rope key [R], nothing per head."""
        return (self.kv_lora_rank,), (self.rope_dim,)

    def cached(self, x_BTD, cos, sin, mask_BTS, adapter_ids_B=None, cache=None):
        """As `Attention.cached`, with the latent cache (latent [B, S, C], rope key [B, S, R]): without a cache
        (prefill) keys and values are expanded per head as in training; with one (decode) the new tokens attend
        in latent space with the up-projections absorbed (`attend_latent`)."""
        latent_BTC, k_rope_BTR = self.latent_kv(x_BTD, cos, sin, adapter_ids_B)
        new = (latent_BTC, k_rope_BTR)
        if cache is None:
            return self._attend_expanded(x_BTD, cos, sin, latent_BTC, k_rope_BTR, mask_BTS, adapter_ids_B), new
        latent_BSC = jnp.concatenate([cache[0].astype(latent_BTC.dtype), latent_BTC], axis=1)
        k_rope_BSR = jnp.concatenate([cache[1].astype(k_rope_BTR.dtype), k_rope_BTR], axis=1)
        return self.attend_latent(x_BTD, cos, sin, latent_BSC, k_rope_BSR, mask_BTS, adapter_ids_B), new

    def _attend_expanded(self, x_BTD, cos, sin, latent_BTC, k_rope_BTR, mask_BTS, adapter_ids_B):
        B, T, _ = x_BTD.shape
        q_nope, q_rope = self.queries(x_BTD, cos, sin, adapter_ids_B)
        k_nope, v = self._kv_up(latent_BTC, adapter_ids_B)
        k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None], (B, T, self.num_heads, self.rope_dim))
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, k_rope_BTHR], axis=-1)
        out = dot_product_attention(q, k, v, mask_BTS, self.scale, causal=True)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_dim), adapter_ids_B)

    def attend_latent(self, x_BTD, cos, sin, latent_BSC, k_rope_BSR, mask_BTS, adapter_ids_B=None):
        """Attention of new tokens x over cached latents, never expanding keys or values per head: the query
        moves into latent space through W_uk (kv_b_proj's key half) and the output comes back through W_uv.

        A LoRA on kv_b_proj (c -> c W + s (c A) B) stays low-rank here: its keys add s (q B_k^T)(c A)^T to the
        scores and its values s (probs (c A)) B_v to the output, so nothing is folded into a bf16 kernel per
        sequence (which would round small early-training updates away and copy the kernel per sequence)."""
        B, T, _ = x_BTD.shape
        H, K, V = self.num_heads, self.nope_dim, self.v_dim
        dtype = x_BTD.dtype
        q_nope, q_rope = self.queries(x_BTD, cos, sin, adapter_ids_B)
        w = self.kv_b_proj.kernel[...].reshape(-1, H, K + V)
        w_uk, w_uv = w[..., :K], w[..., K:]
        scores = (jnp.einsum("BTHK,CHK,BSC->BHTS", q_nope, w_uk, latent_BSC)
                  + jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope_BSR))
        lora = self.kv_b_proj.lora
        if lora is not None and adapter_ids_B is not None:
            scale = lora.lora_scale[...][adapter_ids_B][:, None, None]
            latent_rank = jnp.einsum("BSC,BCr->BSr", latent_BSC, lora.lora_a[...][adapter_ids_B].astype(dtype))
            latent_rank = (latent_rank.astype(jnp.float32) * scale).astype(dtype)
            b = lora.lora_b[...][adapter_ids_B].astype(dtype).reshape(B, -1, H, K + V)
            scores = scores + jnp.einsum("BTHK,BrHK,BSr->BHTS", q_nope, b[..., :K], latent_rank)
        scores = (scores.astype(jnp.float32) * self.scale).astype(dtype)
        scores = jnp.where(mask_BTS[:, None], scores, jnp.finfo(dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
        out = jnp.einsum("BHTS,BSC,CHV->BTHV", probs, latent_BSC, w_uv)
        if lora is not None and adapter_ids_B is not None:
            out = out + jnp.einsum("BHTS,BSr,BrHV->BTHV", probs, latent_rank, b[..., K:])
        return self.o_proj(out.reshape(B, T, H * V), adapter_ids_B)


class DeepseekMoE(nnx.Module):
    """Routed experts (sigmoid group-limited routing) plus always-on shared experts."""

    def __init__(self, cfg: DeepseekV3Config, *, dtype, rngs: nnx.Rngs, lora: LoraConfig | None, impl: MoeImpl,
                 expert_parallel: ExpertParallel):
        D, E = cfg.hidden_size, cfg.n_routed_experts
        self.cfg = cfg
        # The router stays fp32 in every mode (transformers' _keep_in_fp32_modules_strict).
        self.gate = nnx.Param(normal_init(rngs, (D, E), jnp.float32, cfg.initializer_range), axes=("embed", "expert"))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((E,), jnp.float32), axes=("expert",))
        self.experts = RoutedExperts(E, D, cfg.moe_intermediate_size, dtype=dtype, rngs=rngs, lora=lora,
                                     std=cfg.initializer_range, impl=impl, quant=cfg.expert_quant,
                                     expert_parallel=expert_parallel)
        self.shared_experts = (MLP(D, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype=dtype, rngs=rngs,
                                   lora=lora, std=cfg.initializer_range) if cfg.n_shared_experts else None)

    def __call__(self, x_BTD, adapter_ids_B=None, replay_experts_Nk=None, layer_index=None):
        cfg = self.cfg
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = jnp.einsum("ND,DE->NE", x_ND.astype(jnp.float32), self.gate[...])
        weights_Nk, experts_Nk = sigmoid_group_topk_router(
            logits_NE, self.e_score_correction_bias[...], cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
            cfg.norm_topk_prob, cfg.routed_scaling_factor, replay_experts_Nk)
        slot_N = None if adapter_ids_B is None else jnp.repeat(adapter_ids_B, T)
        y = self.experts(x_ND, weights_Nk, experts_Nk, slot_N, layer_index=layer_index).reshape(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BTD, adapter_ids_B)
        return y, experts_Nk


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, cfg: DeepseekV3Config, *, lora: LoraConfig | None = None, dtype: str | None = None,
                 rngs: nnx.Rngs | None = None, moe_impl: str | MoeImpl | None = None,
                 expert_parallel: ExpertParallel = ExpertParallel(), remat: bool | str = "auto",
                 remat_budget_bytes: int = REMAT_BUDGET_BYTES):
        """`moe_impl` (default: the config's) is resolved here, once, and recorded in `self.config.moe_impl`."""
        dt = jnp.dtype(dtype or cfg.dtype)
        impl = resolve_moe_impl(cfg.moe_impl if moe_impl is None else moe_impl, num_experts=cfg.n_routed_experts,
                                hidden_size=cfg.hidden_size, expert_size=cfg.moe_intermediate_size, dtype=dt,
                                quant=cfg.expert_quant, lora=lora)
        cfg = dataclasses.replace(cfg, moe_impl=impl.value)

        def make_layer(rngs: nnx.Rngs, sparse: bool) -> DecoderLayer:
            attn = MultiHeadLatentAttention(cfg, dtype=dt, rngs=rngs, lora=lora)
            mlp = (DeepseekMoE(cfg, dtype=dt, rngs=rngs, lora=lora, impl=impl, expert_parallel=expert_parallel) if sparse else
                   MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dt, rngs=rngs, lora=lora,
                       std=cfg.initializer_range))
            return DecoderLayer(attn, mlp, hidden_size=cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dt, sparse=sparse)

        super().__init__(cfg, make_layer, lora=lora, dtype=dt, rngs=rngs if rngs is not None else nnx.Rngs(0),
                         remat=remat, remat_budget_bytes=remat_budget_bytes)
