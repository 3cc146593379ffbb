"""Mixture-of-experts block: softmax top-k router and dropless routed experts with multi-adapter LoRA.

Token-expert pairs are sorted by (expert, adapter slot) and multiplied group by group with `gmm`, so the work
is proportional to the routed tokens and nothing is dropped. Sorting expert-major keeps each expert's rows
contiguous for the base weight (groups = experts) while each (expert, slot) run is contiguous for the LoRA
factors (groups = experts x slots). The router itself has no LoRA: adapting it would make the routing of a
base-model slot depend on an adapter's training, and top-k is not differentiable anyway.

Letters: N tokens (B*T), M = N*k routed rows, E experts, X adapter slots, J = E*X (expert, slot) pair groups,
D width, F expert hidden, R rank.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.kernels.lora_moe import lora_gmm
from models.layers.grouped_matmul import gmm
from models.layers.linear import normal_init
from models.layers.mlp import silu
from models.layers.moe_impl import MoeImpl, platform_gmm
from models.layers.quantized import ExpertQuant, Int4Weight, reshape_leading, take_layer
from models.lora import ExpertLoRA, LoraConfig
from parallel.expert import ExpertParallel
from parallel.expert import dispatch as expert_dispatch
from parallel.sharding import context_mesh


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


class Projection(NamedTuple):
    """One expert projection as arrays: the frozen weight ([E, in, out], or every layer's [L*E, in, out] read
    at a first expert; an array or a quantized weight) and its LoRA factors (a [X, E, in, R], b [X, E, R, out],
    scale [X]) or None."""
    weight: Any
    lora: tuple | None


class ExpertWeights(NamedTuple):
    """The experts' SwiGLU as a pytree of projections: what the one expert body multiplies with, whole on one
    device or a shard's local experts inside the expert-parallel map."""
    gate: Projection
    up: Projection
    down: Projection


EXPERT_AXES = ExpertWeights(("expert", "embed", "expert_mlp"), ("expert", "embed", "expert_mlp"),
                            ("expert", "expert_mlp", "embed"))


class RoutedExperts(nnx.Module):
    """E SwiGLU experts, weights stored [E, in, out] so `gmm` reads them in place.

    `impl` (`models.layers.moe_impl.MoeImpl`, resolved when the model is built): the grouped matmul, or the
    LoRA-on-MoE kernel of the adapted projections. Traced under a mesh of several devices (`jax.set_mesh`) the
    experts run expert-parallel (`parallel.expert.dispatch`, as `expert_parallel` says); both paths run the
    same expert body (`_swiglu_experts`) on rows sorted by (expert, slot).

    `quant`: keep the (frozen) expert weights quantized (`models/layers/quantized.py`): 4-bit integers with
    group scales, or FP8 with block scales. `gate_proj` etc. then hold the packed int32 words or the float8
    values and `gate_proj_scale` etc. the scales, and every matmul dequantizes one expert (or one kernel tile)
    at a time.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, *, dtype, rngs: nnx.Rngs,
                 lora: LoraConfig | None, impl: MoeImpl, std: float = 0.02, quant: ExpertQuant | None = None,
                 expert_parallel: ExpertParallel = ExpertParallel()):
        E, D, F = num_experts, hidden_size, expert_size
        if not isinstance(impl, MoeImpl):
            raise TypeError(f"RoutedExperts takes a resolved MoeImpl (see resolve_moe_impl), not {impl!r}")
        self.num_experts, self.impl, self.quant, self.expert_parallel = E, impl, quant, expert_parallel
        # projections without LoRA (and the reference LoRA composition) run this grouped matmul
        self.gmm_impl = (impl if impl.kernel == "reference" else
                         platform_gmm(quant is not None, jax.default_backend())).value
        # In a stacked layer the expert weights stay whole under the layer scan and the call's `layer_index` says
        # which layer this is (see models/layers/stack.py): the grouped matmul reads its layer's experts in place.
        whole = dict(scan_whole=True)
        shapes = {"gate_proj": ((E, D, F), EXPERT_AXES.gate), "up_proj": ((E, D, F), EXPERT_AXES.up),
                  "down_proj": ((E, F, D), EXPERT_AXES.down)}
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

    def _loras(self) -> tuple:
        return self.gate_lora, self.up_lora, self.down_lora

    def _expert_weights(self, layer_index, *, whole: bool, with_lora: bool) -> ExpertWeights:
        """The projections' arrays. `whole`: inside a layer scan, every layer's experts flattened to [L*E, ...]
        (a free reshape; the matmuls read this layer's at `layer_index * E`); else this layer's [E, ...] (a
        slice, i.e. a copy, inside a scan: it indexes the stacked [L, E, ...] arrays' layer axis, which keeps
        the expert axis's sharding; a slice of the flattened view would not, and XLA would gather every
        layer's experts onto each device: terabytes for Kimi K2)."""
        projections = []
        for name, lora in zip(self.PROJECTIONS, self._loras()):
            weight = getattr(self, name)[...]
            if self.quant is not None:
                weight = self.quant.weight(weight, getattr(self, f"{name}_scale")[...])
            if layer_index is not None:
                weight = reshape_leading(weight, -1) if whole else take_layer(weight, layer_index)
            factors = ((lora.lora_a[...], lora.lora_b[...], lora.lora_scale[...])
                       if with_lora and lora is not None else None)
            projections.append(Projection(weight, factors))
        return ExpertWeights(*projections)

    def _project(self, rows_MD, projection: Projection, groups, first_expert):
        """One grouped projection: the base gmm, plus each row's slot's LoRA (kernel or composition)."""
        expert_sizes_E, pair_sizes_J, slot_M = groups
        if projection.lora is None or slot_M is None:
            return gmm(rows_MD, projection.weight, expert_sizes_E, self.gmm_impl, first_group=first_expert)
        lora_a, lora_b, lora_scale = projection.lora
        X, E, Din, R = lora_a.shape
        a_JDR = jnp.swapaxes(lora_a, 0, 1).reshape(E * X, Din, R).astype(rows_MD.dtype)
        b_JRF = jnp.swapaxes(lora_b, 0, 1).reshape(E * X, R, -1).astype(rows_MD.dtype)
        scale_M = lora_scale[slot_M]  # fp32: alpha/rank is not rounded to bf16
        return lora_gmm(rows_MD, projection.weight, a_JDR, b_JRF, scale_M, expert_sizes_E, pair_sizes_J,
                        impl=self.impl.kernel, gmm_impl=self.gmm_impl, first_expert=first_expert)

    def _swiglu_experts(self, weights: ExpertWeights, rows_MD, pair_sizes_J, slot_M, num_slots: int, route_M=None,
                        first_expert=None):
        """The expert body: SwiGLU of rows sorted by (expert, slot), pair_sizes_J their (expert, slot) counts.
        With `route_M` (the rows' routing weights) each output row is weighed and rounded to the activation
        dtype before the caller sums a token's k experts, as torch does; a frozen down projection then takes
        the fused `_swiglu_down_and_weigh`, which keeps neither the SwiGLU product nor the outputs."""
        groups = (pair_sizes_J.reshape(-1, num_slots).sum(axis=1), pair_sizes_J, slot_M)
        gate = self._project(rows_MD, weights.gate, groups, first_expert)
        up = self._project(rows_MD, weights.up, groups, first_expert)
        if route_M is None:
            return self._project(_swiglu(gate, up), weights.down, groups, first_expert)
        if weights.down.lora is None or slot_M is None:
            return _swiglu_down_and_weigh(gate, up, weights.down.weight, first_expert, groups[0], route_M,
                                          self.gmm_impl)
        out_MD = self._project(_swiglu(gate, up), weights.down, groups, first_expert)
        return (out_MD * route_M[:, None]).astype(rows_MD.dtype)

    def _expert_parallel(self, mesh, x_ND, route_Nk, experts_Nk, slot_N, layer_index):
        """The expert body on each shard's local experts, rows sent there by `parallel.expert.dispatch`."""
        X = self.gate_lora.lora_a.shape[0] if slot_N is not None else 1
        weights = self._expert_weights(layer_index, whole=False, with_lora=slot_N is not None)
        # The base experts are frozen: without stop_gradient, AD through the dispatch rounds would form (and
        # stack per round) cotangents for them that nobody uses.
        weights = ExpertWeights(*(p._replace(weight=jax.lax.stop_gradient(p.weight)) for p in weights))
        # The map takes arrays: each leaf with its logical axes. A quantized weight's values and scales share
        # its axes (FP8 scales have one entry per block, so shards of them fall between blocks); LoRA factors
        # keep their metadata's axes, less the leading "layers" of a stacked layer.
        axes = []
        for projection, base_axes, lora in zip(weights, EXPERT_AXES, self._loras()):
            axes += [base_axes] * len(jax.tree.leaves(projection.weight))
            if projection.lora is not None:
                axes += [("adapter",) + lora.lora_a.get_metadata("axes")[-3:],
                         ("adapter",) + lora.lora_b.get_metadata("axes")[-3:], ("adapter",)]
        leaves, treedef = jax.tree.flatten(weights)

        def local_experts(local_leaves, rows_RD, key_R):
            """Rows in any order, key = local expert * X + slot (-1: an empty row, which gives zeros); the
            outputs come back in the rows' order."""
            local = jax.tree.unflatten(treedef, local_leaves)
            J = local.gate.weight.shape[0] * X
            sort_key = jnp.where(key_R < 0, J, key_R)  # empty rows sort past the last group: gmm gives zeros
            order = jnp.argsort(sort_key, stable=True)
            slot_M = (sort_key % X)[order] if slot_N is not None else None
            out = self._swiglu_experts(local, rows_RD[order], jnp.bincount(sort_key, length=J), slot_M, X)
            return jnp.zeros_like(out).at[order].set(out)

        down = weights.down.weight
        out_NkD = expert_dispatch(local_experts, leaves, axes, x_ND, experts_Nk, slot_N, num_experts=self.num_experts,
                                  num_slots=X, mesh=mesh, options=self.expert_parallel,
                                  expert_mlp_divides=down.blocks if isinstance(down, Int4Weight) else None)
        return (out_NkD * route_Nk[..., None]).astype(x_ND.dtype).sum(axis=1)

    def __call__(self, x_ND, route_Nk, experts_Nk, slot_N=None, layer_index=None):
        """Rows' weighted expert outputs [N, D]. `layer_index`: inside a layer scan, which layer of the stacked
        (whole) expert weights is this one's; None for weights of this layer alone."""
        N, k = experts_Nk.shape
        if self.gate_lora is None:  # no expert LoRA: group by expert only, whatever the slots
            slot_N = None
        mesh = context_mesh()
        if mesh is not None:  # several devices: expert-parallel dispatch (shard_map), see parallel/expert.py
            return self._expert_parallel(mesh, x_ND, route_Nk, experts_Nk, slot_N, layer_index)
        X = self.gate_lora.lora_a.shape[0] if slot_N is not None else 1
        slot_pairs = jnp.zeros((N * k,), jnp.int32) if slot_N is None else jnp.repeat(slot_N, k)
        sort_key = experts_Nk.reshape(-1) * X + slot_pairs
        order_M = jnp.argsort(sort_key, stable=True)
        unsort_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(N * k, dtype=order_M.dtype))  # inverse
        slot_M = None if slot_N is None else slot_pairs[order_M]
        weights = self._expert_weights(layer_index, whole=True, with_lora=slot_N is not None)
        first = None if layer_index is None else layer_index * self.num_experts
        out_MD = self._swiglu_experts(weights, _dispatch_rows(x_ND, order_M, unsort_M, k),
                                      jnp.bincount(sort_key, length=self.num_experts * X), slot_M, X,
                                      route_Nk.reshape(-1)[order_M], first)
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
                 norm_topk_prob: bool, dtype, rngs: nnx.Rngs, lora: LoraConfig | None, impl: MoeImpl,
                 std: float = 0.02, quant: ExpertQuant | None = None,
                 expert_parallel: ExpertParallel = ExpertParallel()):
        self.top_k, self.norm_topk_prob = num_experts_per_tok, norm_topk_prob
        self.gate = nnx.Param(normal_init(rngs, (hidden_size, num_experts), dtype, std), axes=("embed", "expert"))
        self.experts = RoutedExperts(num_experts, hidden_size, expert_size, dtype=dtype, rngs=rngs, lora=lora,
                                     std=std, impl=impl, quant=quant, expert_parallel=expert_parallel)

    def __call__(self, x_BTD, adapter_ids_B=None, replay_experts_Nk=None, layer_index=None):
        """Returns the output [B, T, D] and the chosen experts [B*T, k]."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = jnp.einsum("ND,DE->NE", x_ND, self.gate[...])
        weights_Nk, experts_Nk = softmax_topk_router(logits_NE, self.top_k, self.norm_topk_prob, replay_experts_Nk)
        slot_N = None if adapter_ids_B is None else jnp.repeat(adapter_ids_B, T)
        y_ND = self.experts(x_ND, weights_Nk, experts_Nk, slot_N, layer_index=layer_index)
        return y_ND.reshape(B, T, D), experts_Nk
