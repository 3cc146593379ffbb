"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`): a ViT with 2D rope and DeepStack mergers feeding the
Qwen3-MoE decoder with interleaved M-RoPE.

Images arrive as `pixel_values` [P, C*T*p*p] in block-major patch order (see `models/image_processing.py`)
with a static grid per image; every shape-defining quantity (grids, interpolation taps, position ids) is
computed on the host in numpy, so one compiled program serves every batch with the same grids.

Letters: P patches, D vision width, H heads, K head dim, F MLP hidden, M = P / merge^2 merged tokens.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import Qwen3VLMoeConfig, VisionConfig
from models.layers.attention import dot_product_attention
from models.layers.decoder import REMAT_BUDGET_BYTES
from models.layers.linear import Linear, normal_init
from models.layers.moe_impl import MoeImpl
from models.layers.norm import LayerNorm
from models.layers.rope import rotate_half
from models.layers.stack import build_stacked
from models.lora import LoraConfig
from parallel.expert import ExpertParallel
from models.qwen3_moe import Qwen3MoeForCausalLM

VISION_NORM_EPS = 1e-6


# ------------------------------------------------------------------------------------------ host-side geometry


def block_major_hw(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid, in merge-block order: (h/m, w/m, m, m)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return (rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
            cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))


def vision_geometry(grid_thw, cfg: VisionConfig):
    """Per patch: bilinear taps into the learned position table (align_corners) [P, 4] and weights [P, 4],
    rope positions (row, col) [P, 2], and the frame each patch attends within [P]."""
    side, merge = int(round(cfg.num_position_embeddings ** 0.5)), cfg.spatial_merge_size
    taps, weights, positions, frames = [], [], [], []
    frame = 0
    for t, h, w in grid_thw:
        rows, cols = block_major_hw(h, w, merge)

        def axis(index, size):
            src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
            floor = np.floor(src)
            tap = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
            weight = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None).astype(np.float32)
            return tap, weight

        (h_tap, h_w), (w_tap, w_w) = axis(rows, h), axis(cols, w)
        tap = (h_tap[:, :, None] * side + w_tap[:, None, :]).reshape(-1, 4)
        weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        taps.append(np.tile(tap, (t, 1)))
        weights.append(np.tile(weight, (t, 1)))
        positions.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
        frames.append(np.repeat(np.arange(frame, frame + t), h * w))
        frame += t
    return (np.concatenate(taps), np.concatenate(weights), np.concatenate(positions), np.concatenate(frames))


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw, cfg: Qwen3VLMoeConfig):
    """3 x [B, T] M-RoPE position ids, as transformers' `get_rope_index`: text advances by one per token;
    an image at position s gets (s, s + row, s + col) per merged token, and text after it continues at
    s + max(h, w) / merge. Images are consumed in order across the batch. Padding positions stay 0
    (transformers writes 1 there; they are masked either way). Image pad tokens that do not add up to the grids
    raise one ValueError line."""
    merge = cfg.vision.spatial_merge_size
    grids = list(image_grid_thw or [])
    expected = sum(t * h * w // merge ** 2 for t, h, w in grids)
    found = int(np.sum((input_ids == cfg.image_token_id) & attention_mask.astype(bool)))
    if found != expected:
        raise ValueError(f"{found} image pad tokens in the batch, but the {len(grids)} image grids make {expected} "
                         "(a truncated or misplaced image?)")
    grids = iter(grids)
    B, T = input_ids.shape
    positions = np.zeros((3, B, T), np.int64)
    for b in range(B):
        keep = attention_mask[b].astype(bool)
        is_image = input_ids[b][keep] == cfg.image_token_id
        current, chunks = 0, []
        for image, group in itertools.groupby(is_image):
            n = len(list(group))
            if not image:
                chunks.append(np.broadcast_to(np.arange(current, current + n), (3, n)))
                current += n
                continue
            while n > 0:  # consecutive images without text in between
                t, h, w = next(grids)
                gt, gh, gw = t, h // merge, w // merge
                if gt * gh * gw > n:
                    raise ValueError(f"sequence {b}: an image of grid {[t, h, w]} needs {gt * gh * gw} pad tokens, "
                                     f"the run has {n} (a truncated image?)")
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
                chunks.append(np.stack([tt.reshape(-1) + current, hh.reshape(-1) + current,
                                        ww.reshape(-1) + current]))
                n -= gt * gh * gw
                current += max(h, w) // merge
        positions[:, b, keep] = np.concatenate(chunks, axis=1) if chunks else 0
    return positions


# ---------------------------------------------------------------------------------------------- vision tower


def vision_rope(positions_P2, head_dim: int, theta: float):
    """Axial 2D rope in fp32: head_dim/4 frequencies per axis, laid out [rows | cols | rows | cols]."""
    spatial = head_dim // 2
    inv_freq = np.float32(1.0) / np.power(np.float32(theta), np.arange(0, spatial, 2, dtype=np.float32)
                                          / np.float32(spatial), dtype=np.float32)
    freqs = positions_P2.astype(np.float32)[:, :, None] * inv_freq  # [P, 2, K/4]
    emb = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    emb = np.concatenate([emb, emb], axis=-1)
    return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        D, std = cfg.hidden_size, cfg.initializer_range
        kw = dict(dtype=dtype, rngs=rngs, std=std, use_bias=True)
        self.num_heads = cfg.num_heads
        self.norm1 = LayerNorm(D, VISION_NORM_EPS, dtype=dtype)
        self.norm2 = LayerNorm(D, VISION_NORM_EPS, dtype=dtype)
        self.qkv = Linear(D, 3 * D, in_axis="embed", out_axis="heads", **kw)
        self.proj = Linear(D, D, in_axis="heads", out_axis="embed", **kw)
        self.linear_fc1 = Linear(D, cfg.intermediate_size, in_axis="embed", out_axis="mlp", **kw)
        self.linear_fc2 = Linear(cfg.intermediate_size, D, in_axis="mlp", out_axis="embed", **kw)

    def __call__(self, x_PD, cos, sin, mask_PP):
        P, D = x_PD.shape
        H = self.num_heads
        qkv = self.qkv(self.norm1(x_PD)[None]).reshape(1, P, 3, H, D // H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        rot = lambda t: (t.astype(jnp.float32) * cos[None, :, None] + rotate_half(t.astype(jnp.float32))  # noqa: E731
                         * sin[None, :, None]).astype(t.dtype)
        attn = dot_product_attention(rot(q), rot(k), v, mask_PP[None], (D // H) ** -0.5)
        x_PD = x_PD + self.proj(attn.reshape(1, P, D))[0]
        h = self.linear_fc1(self.norm2(x_PD)[None])
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(h.dtype)
        return x_PD + self.linear_fc2(h)[0]


class PatchMerger(nnx.Module):
    """2x2 neighbouring patches (consecutive in block-major order) to one token of the language width. The
    final merger normalises each patch before the shuffle, the DeepStack mergers the shuffled vector."""

    def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool, dtype, rngs: nnx.Rngs):
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.merged, self.postshuffle_norm = merged, postshuffle_norm
        self.norm = LayerNorm(merged if postshuffle_norm else cfg.hidden_size, VISION_NORM_EPS, dtype=dtype)
        kw = dict(dtype=dtype, rngs=rngs, std=cfg.initializer_range, use_bias=True)
        self.linear_fc1 = Linear(merged, merged, in_axis="mlp", out_axis="mlp", **kw)
        self.linear_fc2 = Linear(merged, cfg.out_hidden_size, in_axis="mlp", out_axis="embed", **kw)

    def __call__(self, x_PD):
        x = self.norm(x_PD.reshape(-1, self.merged)) if self.postshuffle_norm else self.norm(x_PD).reshape(-1, self.merged)
        h = self.linear_fc1(x[None])
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype)  # exact GELU here
        return self.linear_fc2(h)[0]


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = Linear(patch_dim, cfg.hidden_size, in_axis="mlp", out_axis="embed", dtype=dtype,
                                  rngs=rngs, std=cfg.initializer_range, use_bias=True)
        self.pos_embed = nnx.Param(normal_init(rngs, (cfg.num_position_embeddings, cfg.hidden_size), dtype,
                                               cfg.initializer_range), axes=("vocab", "embed"))
        self.blocks = build_stacked(cfg.depth, lambda r: VisionBlock(cfg, dtype=dtype, rngs=r), rngs)
        self.merger = PatchMerger(cfg, postshuffle_norm=False, dtype=dtype, rngs=rngs)
        n = len(cfg.deepstack_visual_indexes)
        self.deepstack_merger_list = (build_stacked(
            n, lambda r: PatchMerger(cfg, postshuffle_norm=True, dtype=dtype, rngs=r), rngs) if n else None)

    def __call__(self, pixel_values, image_grid_thw):
        """Merged image tokens [M, D_text] and DeepStack features [n, M, D_text] for static grids."""
        cfg = self.cfg
        taps, weights, positions, frames = vision_geometry(image_grid_thw, cfg)
        x = self.patch_embed(pixel_values.astype(self.pos_embed.dtype)[None])[0]
        pos = jnp.einsum("PT,PTD->PD", jnp.asarray(weights),
                         self.pos_embed[...][jnp.asarray(taps)].astype(jnp.float32))
        x = x + pos.astype(x.dtype)
        cos, sin = vision_rope(positions, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        mask = jnp.asarray(frames[:, None] == frames[None, :])

        graphdef, state = nnx.split(self.blocks)
        ends = sorted(set(cfg.deepstack_visual_indexes)) + [cfg.depth - 1]
        features, start = {}, 0
        for end in ends:  # scan up to each DeepStack layer, keep its output, continue
            if end < start:
                continue
            part = jax.tree.map(lambda a, s=start, e=end: a[s:e + 1], state)

            def body(h, layer_state):
                return nnx.merge(graphdef, layer_state)(h, cos, sin, mask), None

            x, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x, part)
            features[end], start = x, end + 1
        merged = self.merger(x)
        if self.deepstack_merger_list is None:
            return merged, None
        m_graphdef, m_state = nnx.split(self.deepstack_merger_list)
        deepstack = jnp.stack([
            nnx.merge(m_graphdef, jax.tree.map(lambda a, i=i: a[i], m_state))(features[layer])
            for i, layer in enumerate(cfg.deepstack_visual_indexes)])
        return merged, deepstack


class Qwen3VLMoeForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: Qwen3VLMoeConfig, *, lora: LoraConfig | None = None, dtype: str | None = None,
                 rngs: nnx.Rngs | None = None, moe_impl: str | MoeImpl | None = None,
                 expert_parallel: ExpertParallel = ExpertParallel(), remat: bool | str = "auto",
                 remat_budget_bytes: int = REMAT_BUDGET_BYTES):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = jnp.dtype(dtype or cfg.text.dtype)
        self.dtype = dt
        self.visual = VisionTower(cfg.vision, dtype=dt, rngs=rngs)
        self.language_model = Qwen3MoeForCausalLM(cfg.text, lora=lora, dtype=dtype, rngs=rngs, moe_impl=moe_impl,
                                                  expert_parallel=expert_parallel, remat=remat,
                                                  remat_budget_bytes=remat_budget_bytes)
        self.config = dataclasses.replace(cfg, text=self.language_model.config)  # with the resolved moe_impl

    @property
    def segment_layout(self):
        return self.language_model.segment_layout

    def hidden_states(self, input_ids_BT, *, attention_mask_BT=None, positions_BT=None, adapter_ids_B=None,
                      replay_experts=None, pixel_values=None, image_grid_thw=None):
        """As `CausalLM.hidden_states`, plus images: `pixel_values` [P, C*T*p*p] for the static grids
        `image_grid_thw` ((t, h, w) per image, in order of appearance); `positions_BT` must then be the
        [3, B, T] M-RoPE positions from `mrope_positions`."""
        lm = self.language_model
        if pixel_values is None:
            return lm.hidden_states(input_ids_BT, attention_mask_BT=attention_mask_BT, positions_BT=positions_BT,
                                    adapter_ids_B=adapter_ids_B, replay_experts=replay_experts)
        if positions_BT is None or positions_BT.ndim != 3:
            raise ValueError("with images, pass positions_BT = mrope_positions(...) of shape [3, B, T]")
        inputs_embeds, deepstack = self.multimodal_embeddings(input_ids_BT, pixel_values, image_grid_thw)
        return lm.hidden_states(input_ids_BT, attention_mask_BT=attention_mask_BT, positions_BT=positions_BT,
                                adapter_ids_B=adapter_ids_B, replay_experts=replay_experts,
                                inputs_embeds=inputs_embeds, deepstack=deepstack)

    def multimodal_embeddings(self, input_ids_BT, pixel_values, image_grid_thw):
        """Token embeddings with the image features at the image pad tokens [B, T, D], and the DeepStack
        injection (flat token index, features) or None: the language model's inputs (also for a sampler's
        prefill)."""
        lm = self.language_model
        B, T = input_ids_BT.shape
        image_tokens, deepstack = self.visual(pixel_values, image_grid_thw)
        # Image pad tokens and image features must agree in number (`mrope_positions` checks it on the host);
        # should they not, surplus features are dropped rather than written over token 0.
        index = jnp.nonzero(input_ids_BT.reshape(-1) == self.config.image_token_id, size=image_tokens.shape[0],
                            fill_value=B * T)[0]
        x = lm.embed(input_ids_BT).reshape(B * T, -1).at[index].set(image_tokens.astype(lm.dtype), mode="drop")
        return x.reshape(B, T, -1), None if deepstack is None else (index, deepstack)

    def logits(self, h_BTD, adapter_ids_B=None):
        return self.language_model.logits(h_BTD, adapter_ids_B)

    def target_logprobs(self, h_BTD, targets_BTK, adapter_ids_B=None, chunk_size: int = 8192):
        return self.language_model.target_logprobs(h_BTD, targets_BTK, adapter_ids_B, chunk_size)

    def __call__(self, input_ids_BT, **kwargs):
        adapter_ids_B = kwargs.get("adapter_ids_B")
        h, _ = self.hidden_states(input_ids_BT, **kwargs)
        return self.logits(h, adapter_ids_B)
