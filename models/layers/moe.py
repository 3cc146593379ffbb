"""Mixture-of-experts block: softmax top-k router and dropless routed experts with multi-adapter LoRA.

Token-expert pairs are sorted by (expert, adapter slot) and multiplied group by group with `gmm`, so the work
is proportional to the routed tokens and nothing is dropped. Sorting expert-major keeps each expert's rows
contiguous for the base weight (groups = experts) while each (expert, slot) run is contiguous for the LoRA
factors (groups = experts x slots). The router itself has no LoRA: adapting it would make the routing of a
base-model slot depend on an adapter's training, and top-k is not differentiable anyway.

Letters: N tokens (B*T), M = N*k routed rows, E experts, X adapter slots, D width, F expert hidden, R rank.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.kernels.lora_moe import lora_gmm, split_moe_impl
from models.layers.grouped_matmul import gmm
from models.layers.quantized import ExpertQuant, Int4Weight, reshape_leading, take_layer
from models.layers.linear import normal_init
from models.layers.mlp import silu
from models.lora import ExpertLoRA, LoraConfig
from parallel.expert import dispatch as expert_dispatch
from parallel.sharding import active_layout


def softmax_topk_router(logits_NE, k: int, norm_topk_prob: bool, replay_experts_Nk=None):
    """Qwen routing: fp32 softmax, top-k, optional renormalisation, weights cast back to the logits dtype.

    `replay_experts_Nk` replays a given expert choice (weights still come from these logits): routing replay,
    so two runs (trainer and sampler, or bf16 and fp32) can be compared or kept consistent despite near-ties.
    """
    probs = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    if replay_experts_Nk is None:
        weights_Nk, experts_Nk = jax.lax.top_k(probs, k)
    else:
        experts_Nk = replay_experts_Nk.astype(jnp.int32)
        weights_Nk = jnp.take_along_axis(probs, experts_Nk, axis=-1)
    if norm_topk_prob:
        weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
    return weights_Nk.astype(logits_NE.dtype), experts_Nk


def sigmoid_group_topk_router(logits_NE, bias_E, k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                              scaling: float, replay_experts_Nk=None):
    """DeepSeek-V3 / Kimi K2 routing, in fp32: sigmoid scores; the correction bias only chooses experts: the
    best `topk_group` of `n_group` groups (scored by their top-2 sum), then the top k within them. Weights are
    the unbiased scores, renormalised (+1e-20) if asked, times `routed_scaling_factor`; they stay fp32."""
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    if replay_experts_Nk is None:
        N, E = scores_NE.shape
        choice_NE = scores_NE + bias_E.astype(jnp.float32)
        if topk_group < n_group:  # group-limited: keep the best topk_group groups (scored by their top-2 sum)
            group_scores = jax.lax.top_k(choice_NE.reshape(N, n_group, E // n_group), 2)[0].sum(axis=-1)
            _, top_groups = jax.lax.top_k(group_scores, topk_group)
            group_mask = jnp.any(jax.nn.one_hot(top_groups, n_group, dtype=bool), axis=1)
            choice_NE = jnp.where(jnp.repeat(group_mask, E // n_group, axis=1), choice_NE, -jnp.inf)
        _, experts_Nk = jax.lax.top_k(choice_NE, k)
    else:
        experts_Nk = replay_experts_Nk.astype(jnp.int32)
    weights_Nk = jnp.take_along_axis(scores_NE, experts_Nk, axis=-1)
    if norm_topk_prob:
        weights_Nk = weights_Nk / (jnp.sum(weights_Nk, axis=-1, keepdims=True) + 1e-20)
    return weights_Nk * scaling, experts_Nk


class RoutedExperts(nnx.Module):
    """E SwiGLU experts, weights stored [E, in, out] so `gmm` reads them in place.

    `impl`: a grouped-matmul implementation ("auto", "loop", "ragged", "dense", "blocked") or a LoRA-on-MoE
    kernel ("pallas", "triton", "mosaic_tpu"); see `models.kernels.lora_moe` ("auto" uses the kernel on
    accelerators). Under an active mesh layout the experts run expert-parallel (`parallel.expert.dispatch`,
    configured by the layout's `expert_dispatch` and `capacity_factor`).

    `quant`: keep the (frozen) expert weights quantized (`models/layers/quantized.py`): 4-bit integers with
    group scales, or FP8 with block scales. `gate_proj` etc. then hold the packed int32 words or the float8
    values and `gate_proj_scale` etc. the scales, and every matmul dequantizes one expert (or one kernel tile)
    at a time.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, *, dtype, rngs: nnx.Rngs,
                 lora: LoraConfig | None, std: float = 0.02, impl: str = "auto", quant: ExpertQuant | None = None):
        E, D, F = num_experts, hidden_size, expert_size
        self.num_experts, self.impl, self.quant = E, impl, quant
        # In a stacked layer the expert weights stay whole under the layer scan and the call's `layer_index` says
        # which layer this is (see models/layers/stack.py): the grouped matmul reads its layer's experts in place.
        whole = dict(scan_whole=True)
        shapes = {"gate_proj": ((E, D, F), ("expert", "embed", "expert_mlp")),
                  "up_proj": ((E, D, F), ("expert", "embed", "expert_mlp")),
                  "down_proj": ((E, F, D), ("expert", "expert_mlp", "embed"))}
        for name, (shape, axes) in shapes.items():
            if quant is None:
                setattr(self, name, nnx.Param(normal_init(rngs, shape, dtype, std), axes=axes, **whole))
                continue
            values, scale = quant.init(rngs.params(), shape, dtype, std)
            setattr(self, name, nnx.Param(values, axes=axes, **whole))
            setattr(self, f"{name}_scale", nnx.Param(scale, axes=axes, **whole))
        use_lora = lora is not None and lora.mlp
        self.gate_lora = ExpertLoRA(E, D, F, lora, in_axis="embed", out_axis="expert_mlp") if use_lora else None
        self.up_lora = ExpertLoRA(E, D, F, lora, in_axis="embed", out_axis="expert_mlp") if use_lora else None
        self.down_lora = ExpertLoRA(E, F, D, lora, in_axis="expert_mlp", out_axis="embed") if use_lora else None

    def _weights(self):
        """gate, up, down: arrays, or the quantized weights their (values, scales) parameters stand for."""
        if self.quant is None:
            return [getattr(self, name)[...] for name in self.PROJECTIONS]
        return [self.quant.weight(getattr(self, name)[...], getattr(self, f"{name}_scale")[...])
                for name in self.PROJECTIONS]

    def _base_weights(self, layer_index):
        """(gate, up, down, first expert): this layer's [E, in, out] weights, or inside a layer scan every
        layer's experts flattened to [L*E, in, out] (a free reshape) and this layer's first row of them."""
        weights = self._weights()
        if layer_index is None:
            return (*weights, None)
        flat = [reshape_leading(w, -1) for w in weights]
        return (*flat, layer_index * self.num_experts)

    def _layer_weights(self, layer_index):
        """This layer's [E, in, out] weights (a slice, i.e. a copy, inside a layer scan). The slice indexes the
        stacked [L, E, ...] arrays' layer axis, which keeps the expert axis's sharding; a slice of the flattened
        [L*E, ...] view would not (its merged axis cannot carry a sharding of the minor E), and XLA would
        gather every layer's experts onto each device: terabytes for Kimi K2."""
        weights = self._weights()
        if layer_index is None:
            return weights
        return [take_layer(w, layer_index) for w in weights]

    def _project(self, rows_MD, weight, first_expert, lora: ExpertLoRA | None, expert_sizes_E, pair_sizes_EX, slot_M):
        factors = None if lora is None else (lora.lora_a[...], lora.lora_b[...], lora.lora_scale[...])
        return self._project_arrays(rows_MD, weight, factors, expert_sizes_E, pair_sizes_EX, slot_M, first_expert)

    def _project_arrays(self, rows_MD, weight, factors, expert_sizes_E, pair_sizes_EX, slot_M, first_expert=None):
        """One grouped projection from raw arrays (also the local shards inside the expert-parallel map)."""
        lora_impl, gmm_impl = split_moe_impl(self.impl)
        if factors is None or slot_M is None:
            return gmm(rows_MD, weight, expert_sizes_E, gmm_impl, first_group=first_expert)
        lora_a, lora_b, lora_scale = factors
        X = lora_a.shape[0]
        E, Din, R = expert_sizes_E.shape[0], lora_a.shape[2], lora_a.shape[3]
        a_GDR = jnp.swapaxes(lora_a, 0, 1).reshape(E * X, Din, R).astype(rows_MD.dtype)
        b_GRF = jnp.swapaxes(lora_b, 0, 1).reshape(E * X, R, -1).astype(rows_MD.dtype)
        scale_M = lora_scale[slot_M]  # fp32: alpha/rank is not rounded to bf16
        # base gmm + LoRA shrink/expand: the Pallas kernel on accelerators, else the gmm composition
        return lora_gmm(rows_MD, weight, a_GDR, b_GRF, scale_M, expert_sizes_E, pair_sizes_EX, impl=lora_impl,
                        gmm_impl=gmm_impl, first_expert=first_expert)

    def _experts(self, params, rows_MD, pair_sizes_EX, slot_M):
        """SwiGLU of rows sorted by (expert, slot): params = (gate, up, down[, gate/up/down LoRA factors])."""
        gate_w, up_w, down_w = params[:3]
        E = gate_w.shape[0]  # (a quantized weight has a shape too)
        lora = [tuple(params[3 + 3 * i:6 + 3 * i]) if len(params) > 3 else None for i in range(3)]
        expert_sizes_E = pair_sizes_EX.reshape(E, -1).sum(axis=1)
        args = (expert_sizes_E, pair_sizes_EX, slot_M)
        gate = self._project_arrays(rows_MD, gate_w, lora[0], *args)
        up = self._project_arrays(rows_MD, up_w, lora[1], *args)
        return self._project_arrays(silu(gate) * up, down_w, lora[2], *args)

    def _local_compute(self, num_slots: int, treedef):
        """Expert-parallel shard body: rows in any order with key = local expert * X + slot (-1: empty row);
        sorts, multiplies with the local experts only, returns outputs in the rows' order (zeros if empty).
        The shard map passes arrays: `treedef` rebuilds the params (a quantized weight is two arrays)."""
        def compute(leaves, rows_RD, key_R):
            params = jax.tree.unflatten(treedef, leaves)
            G = params[0].shape[0] * num_slots
            sort_key = jnp.where(key_R < 0, G, key_R)  # empty rows sort past the last group: gmm gives zeros
            order = jnp.argsort(sort_key, stable=True)
            pair_sizes = jnp.bincount(sort_key, length=G)
            slot_M = (sort_key % num_slots)[order] if len(params) > 3 else None
            out = self._experts(params, rows_RD[order], pair_sizes, slot_M)
            return jnp.zeros_like(out).at[order].set(out)
        return compute

    def _sharded(self, x_ND, weights_Nk, experts_Nk, slot_N, layout, layer_index):
        lora = (self.gate_lora, self.up_lora, self.down_lora) if slot_N is not None else ()
        # The base experts are frozen: without stop_gradient, AD through the dispatch rounds would form (and
        # stack per round) cotangents for them that nobody uses.
        params = [jax.lax.stop_gradient(w) for w in self._layer_weights(layer_index)]
        # a quantized weight's values and scales share its axes (FP8 scales have one entry per block, so shards
        # of them fall between blocks); a 4-bit down projection's packed side (expert_mlp) is split only between
        # its blocks of 8 nibble planes
        axes = [("expert", "embed", "expert_mlp")] * 2 + [("expert", "expert_mlp", "embed")]
        axes = [a for w, a in zip(params, axes) for _ in jax.tree.leaves(w)]
        for m in lora:  # factors keep their metadata's axes, less the leading "layers" of a stacked layer
            params += [m.lora_a[...], m.lora_b[...], m.lora_scale[...]]
            axes += [("adapter",) + m.lora_a.get_metadata("axes")[-3:],
                     ("adapter",) + m.lora_b.get_metadata("axes")[-3:], ("adapter",)]
        X = self.gate_lora.lora_a.shape[0] if lora else 1
        leaves, treedef = jax.tree.flatten(params)
        down = params[2]
        out_NkD = expert_dispatch(self._local_compute(X, treedef), leaves, axes, x_ND, experts_Nk,
                                  slot_N if lora else None, num_experts=self.num_experts, num_slots=X, layout=layout,
                                  capacity_factor=layout.capacity_factor, strategy=layout.expert_dispatch,
                                  expert_mlp_divides=down.blocks if isinstance(down, Int4Weight) else None)
        out_NkD = (out_NkD * weights_Nk[..., None]).astype(x_ND.dtype)
        return out_NkD.sum(axis=1)

    def __call__(self, x_ND, weights_Nk, experts_Nk, slot_N=None, layer_index=None):
        """Rows' weighted expert outputs [N, D]. `layer_index`: inside a layer scan, which layer of the stacked
        (whole) expert weights is this one's; None for weights of this layer alone."""
        N, k = experts_Nk.shape
        E = self.num_experts
        if self.gate_lora is None:  # no expert LoRA: group by expert only, whatever the slots
            slot_N = None
        layout = active_layout()
        if layout is not None:  # a mesh is active: expert-parallel dispatch (shard_map), see parallel/expert.py
            return self._sharded(x_ND, weights_Nk, experts_Nk, slot_N, layout, layer_index)
        X = self.gate_lora.lora_a.shape[0] if slot_N is not None else 1
        slot_pairs = jnp.zeros((N * k,), jnp.int32) if slot_N is None else jnp.repeat(slot_N, k)
        sort_key = experts_Nk.reshape(-1) * X + slot_pairs
        order_M = jnp.argsort(sort_key, stable=True)
        pair_sizes_EX = jnp.bincount(sort_key, length=E * X)
        expert_sizes_E = pair_sizes_EX.reshape(E, X).sum(axis=1)
        slot_M = None if slot_N is None else slot_pairs[order_M]

        unsort_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(N * k, dtype=order_M.dtype))  # inverse
        rows_MD = _dispatch_rows(x_ND, order_M, unsort_M, k)
        args = (expert_sizes_E, pair_sizes_EX, slot_M)
        gate_w, up_w, down_w, first = self._base_weights(layer_index)
        gate = self._project(rows_MD, gate_w, first, self.gate_lora, *args)
        up = self._project(rows_MD, up_w, first, self.up_lora, *args)
        weights_M = weights_Nk.reshape(-1)[order_M]
        # torch multiplies by the routing weight (bf16 for Qwen, fp32 for DeepSeek) and rounds to the activation
        # dtype before accumulating the k experts; do the same.
        if self.down_lora is None or slot_M is None:
            out_MD = _swiglu_down_and_weigh(gate, up, down_w, first, expert_sizes_E, weights_M,
                                            split_moe_impl(self.impl)[1])
        else:
            out_MD = self._project(_swiglu(gate, up), down_w, first, self.down_lora, *args)
            out_MD = (out_MD * weights_M[:, None]).astype(x_ND.dtype)
        return _combine_rows(out_MD, order_M, unsort_M).reshape(N, k, -1).sum(axis=1)


# Rows move between token order and (expert, slot) order by permutations. Autodiff would transpose each gather
# into a scatter-add (slow on CPU, and serial on accelerators); knowing they are permutations, the backward is
# a gather by the inverse permutation instead.

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch_rows(x_ND, order_M, unsort_M, k: int):
    """Row m of the result is token order_M[m] // k's row: each token once per chosen expert, sorted."""
    return x_ND[order_M // k]


def _dispatch_rows_fwd(x_ND, order_M, unsort_M, k):
    return x_ND[order_M // k], unsort_M


def _dispatch_rows_bwd(k, unsort_M, d_rows_MD):
    d_x_ND = d_rows_MD[unsort_M].reshape(-1, k, d_rows_MD.shape[-1]).sum(axis=1)
    return d_x_ND, None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def _combine_rows(out_MD, order_M, unsort_M):
    """Back from sorted order to (token, choice) order: the inverse permutation of the sort."""
    return out_MD[unsort_M]


def _combine_rows_fwd(out_MD, order_M, unsort_M):
    return out_MD[unsort_M], order_M


def _combine_rows_bwd(order_M, d_pairs_MD):
    return d_pairs_MD[order_M], None, None


_combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def _swiglu(gate_MF, up_MF):
    return silu(gate_MF) * up_MF


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _swiglu_down_and_weigh(gate_MF, up_MF, w, first, expert_sizes_E, weights_M, impl: str):
    """(gmm(silu(gate) * up, w) * weights).astype(dtype): the experts' SwiGLU and down projection (frozen, no
    LoRA: no weight gradient) times each row's routing weight. The backward keeps only gate and up (the SwiGLU
    product is recomputed), and takes the routing weights' gradient as <dy·Wᵀ, h> over F instead of <dy, h·W>
    over D, so neither h nor the [M, D] expert outputs are kept; the same dy·Wᵀ, times the weight, is h's
    gradient."""
    h_MF = _swiglu(gate_MF, up_MF)
    return (gmm(h_MF, w, expert_sizes_E, impl, first_group=first) * weights_M[:, None]).astype(h_MF.dtype)


def _swiglu_down_and_weigh_fwd(gate_MF, up_MF, w, first, expert_sizes_E, weights_M, impl):
    out = _swiglu_down_and_weigh(gate_MF, up_MF, w, first, expert_sizes_E, weights_M, impl)
    return out, (gate_MF, up_MF, w, first, expert_sizes_E, weights_M)


def _swiglu_down_and_weigh_bwd(impl, residuals, dy_MD):
    gate_MF, up_MF, w, first, expert_sizes_E, weights_M = residuals
    h_MF, swiglu_pull = jax.vjp(_swiglu, gate_MF, up_MF)
    _, down_pull = jax.vjp(lambda h: gmm(h, w, expert_sizes_E, impl, first_group=first), h_MF)
    g_MF = down_pull(dy_MD.astype(h_MF.dtype))[0]
    d_weights_M = jnp.sum(g_MF.astype(jnp.float32) * h_MF.astype(jnp.float32), axis=-1).astype(weights_M.dtype)
    d_gate_MF, d_up_MF = swiglu_pull((g_MF * weights_M[:, None]).astype(h_MF.dtype))
    return d_gate_MF, d_up_MF, None, None, None, d_weights_M


_swiglu_down_and_weigh.defvjp(_swiglu_down_and_weigh_fwd, _swiglu_down_and_weigh_bwd)


class SparseMoeBlock(nnx.Module):
    def __init__(self, *, hidden_size: int, num_experts: int, num_experts_per_tok: int, expert_size: int,
                 norm_topk_prob: bool, dtype, rngs: nnx.Rngs, lora: LoraConfig | None, std: float = 0.02,
                 impl: str = "auto", quant: ExpertQuant | None = None):
        self.top_k, self.norm_topk_prob = num_experts_per_tok, norm_topk_prob
        self.gate = nnx.Param(normal_init(rngs, (hidden_size, num_experts), dtype, std), axes=("embed", "expert"))
        self.experts = RoutedExperts(num_experts, hidden_size, expert_size, dtype=dtype, rngs=rngs, lora=lora,
                                     std=std, impl=impl, quant=quant)

    def __call__(self, x_BTD, adapter_ids_B=None, replay_experts_Nk=None, layer_index=None):
        """Returns the output [B, T, D] and the chosen experts [B*T, k]."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = jnp.einsum("ND,DE->NE", x_ND, self.gate[...])
        weights_Nk, experts_Nk = softmax_topk_router(logits_NE, self.top_k, self.norm_topk_prob, replay_experts_Nk)
        slot_N = None if adapter_ids_B is None else jnp.repeat(adapter_ids_B, T)
        y_ND = self.experts(x_ND, weights_Nk, experts_Nk, slot_N, layer_index=layer_index)
        return y_ND.reshape(B, T, D), experts_Nk
