"""Hugging Face checkpoints -> jtinker parameters through a name-mapping table.

The table maps each jtinker parameter to the checkpoint tensor(s) it comes from, with the transpose / slice /
stack that turns them into jtinker's layout ([in, out] kernels, [L, ...] stacked layers, [E, in, out] experts).
The model is first created abstractly (shapes only), then every parameter is built by
`jax.make_array_from_callback`, which reads only the slice each device needs straight from the memory-mapped
safetensors: the checkpoint is never in memory twice, and sharded loading needs no other code.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import (DeepseekV3Config, Qwen3MoeConfig, Qwen3VLMoeConfig, VisionConfig, load_config,
                           with_quantization_config)
from models.families import model_class
from models.lora import LoRAParam, LoRAScale
from models.layers.quantized import NIBBLES, ExpertQuant
from models.quantization import int4_for_gmm, open_checkpoint
from models.safetensors_io import Checkpoint, CheckpointError

# Checkpoint tensors that carry no parameters of ours.
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: optionally sliced along `take = (axis, start, stop)`, reshaped, then permuted."""

    name: str
    hf_shape: tuple[int, ...]
    perm: tuple[int, ...] | None = None
    take: tuple[int, int, int] | None = None
    reshape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.hf_shape)
        if self.take:
            axis, start, stop = self.take
            shape[axis] = stop - start
        if self.reshape:
            shape = list(self.reshape)
        return tuple(shape[p] for p in self.perm) if self.perm else tuple(shape)

    def leaves(self):
        yield self

    def read(self, ckpt: Checkpoint, index) -> np.ndarray:
        arr = ckpt.tensor(self.name)
        if self.take:
            axis, start, stop = self.take
            arr = arr[(slice(None),) * axis + (slice(start, stop),)]
        if self.reshape:
            arr = arr.reshape(self.reshape)
        if self.perm:
            arr = arr.transpose(self.perm)
        return np.asarray(arr[index])


@dataclasses.dataclass(frozen=True)
class Stacked:
    """A new leading axis over parts (layers, or experts stored one by one)."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts),) + self.parts[0].shape

    def leaves(self):
        for part in self.parts:
            yield from part.leaves()

    def read(self, ckpt: Checkpoint, index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        first, rest = index[0], index[1:]
        chosen = range(len(self.parts))[first] if isinstance(first, slice) else [first]
        out = np.stack([self.parts[i].read(ckpt, rest) for i in chosen])
        return out if isinstance(first, slice) else out[0]


@dataclasses.dataclass(frozen=True)
class QuantizedPart:
    """The values (`part="values"`) or scales (`"scale"`) of one quantized checkpoint matrix kept quantized, as
    the [in, out] weight `gmm` reads: 4-bit words re-packed from compressed-tensors' layout, or float8 values
    transposed, never as floats."""

    name: str  # the logical `X.weight` the checkpoint view presents
    hf_shape: tuple[int, int]  # [out, in]
    quant: ExpertQuant
    part: str

    @property
    def shape(self) -> tuple[int, ...]:
        out, inp = self.hf_shape
        if self.quant.kind == "fp8":
            bo, bi = self.quant.block  # the checkpoint's [out, in] blocks, transposed with the weight
            return (inp, out) if self.part == "values" else (-(-inp // bi), -(-out // bo))
        return (inp // NIBBLES if self.part == "values" else inp // self.quant.group, out)

    def leaves(self):
        yield self

    def read(self, ckpt, index) -> np.ndarray:
        values, scale = ckpt.quantized_parts(self.name, self.quant.kind)
        if self.part == "scale":
            return np.asarray(scale.T[index])
        if self.quant.kind == "fp8":
            return np.asarray(values.T[index])
        return np.asarray(int4_for_gmm(values, scale, self.hf_shape[1], scale.dtype).packed[index])


def linear(name: str, in_features: int, out_features: int) -> Tensor:
    """A torch Linear weight [out, in] read as our kernel [in, out]."""
    return Tensor(name, (out_features, in_features), perm=(1, 0))


def _expert_sources(ckpt: Checkpoint, prefix: str, E: int, D: int, F: int,
                    quant: ExpertQuant | None = None) -> dict[str, object]:
    """gate/up/down expert weights as [E, in, out], from per-expert tensors or a fused gate_up_proj; with
    `quant`, per-expert quantized tensors kept quantized (gate_proj = values, gate_proj_scale = scales).

    Fused layouts: transformers 5 writes gate_up_proj [E, 2F, D] and down_proj [E, D, F]; original Qwen3-VL
    checkpoints store them transposed ([E, D, 2F], [E, F, D]). When D == 2F gate_up_proj's shape cannot tell
    them apart, but down_proj's can (F != D then), so the pair decides.
    """
    fused = f"{prefix}.experts.gate_up_proj"
    if quant is not None:
        out = {}
        for proj, i, o in (("gate_proj", D, F), ("up_proj", D, F), ("down_proj", F, D)):
            for part, suffix in (("values", ""), ("scale", "_scale")):
                out[proj + suffix] = Stacked(tuple(QuantizedPart(f"{prefix}.experts.{e}.{proj}.weight", (o, i), quant,
                                                                 part) for e in range(E)))
        return out
    if fused in ckpt:
        shape = ckpt.shape(fused)
        down_name = f"{prefix}.experts.down_proj"
        down_shape = ckpt.shape(down_name) if down_name in ckpt else (E, D, F)
        if shape not in ((E, 2 * F, D), (E, D, 2 * F)):
            raise CheckpointError(f"tensor {fused!r}: expected shape {[E, 2 * F, D]} (or {[E, D, 2 * F]}), "
                                  f"found {list(shape)}")
        original = shape == (E, D, 2 * F) and (shape != (E, 2 * F, D) or down_shape == (E, F, D) != (E, D, F))
        if original:
            gate, up = Tensor(fused, shape, take=(2, 0, F)), Tensor(fused, shape, take=(2, F, 2 * F))
            down = Tensor(down_name, (E, F, D))
        else:
            gate = Tensor(fused, shape, perm=(0, 2, 1), take=(1, 0, F))
            up = Tensor(fused, shape, perm=(0, 2, 1), take=(1, F, 2 * F))
            down = Tensor(down_name, (E, D, F), perm=(0, 2, 1))
        return {"gate_proj": gate, "up_proj": up, "down_proj": down}
    per_expert = lambda proj, i, o: Stacked(tuple(  # noqa: E731
        linear(f"{prefix}.experts.{e}.{proj}.weight", i, o) for e in range(E)))
    return {"gate_proj": per_expert("gate_proj", D, F), "up_proj": per_expert("up_proj", D, F),
            "down_proj": per_expert("down_proj", F, D)}


def _layer_sources(ckpt: Checkpoint, cfg: Qwen3MoeConfig, layer: int, sparse: bool,
                   prefix: str = "model") -> dict[tuple, object]:
    p = f"{prefix}.layers.{layer}"
    D, H, G, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out: dict[tuple, object] = {
        ("input_layernorm", "weight"): Tensor(f"{p}.input_layernorm.weight", (D,)),
        ("post_attention_layernorm", "weight"): Tensor(f"{p}.post_attention_layernorm.weight", (D,)),
        ("self_attn", "q_norm", "weight"): Tensor(f"{p}.self_attn.q_norm.weight", (K,)),
        ("self_attn", "k_norm", "weight"): Tensor(f"{p}.self_attn.k_norm.weight", (K,)),
    }
    for proj, i, o in (("q_proj", D, H * K), ("k_proj", D, G * K), ("v_proj", D, G * K), ("o_proj", H * K, D)):
        out[("self_attn", proj, "kernel")] = linear(f"{p}.self_attn.{proj}.weight", i, o)
        if cfg.attention_bias:
            out[("self_attn", proj, "bias")] = Tensor(f"{p}.self_attn.{proj}.bias", (o,))
    if sparse:
        out[("mlp", "gate")] = linear(f"{p}.mlp.gate.weight", D, cfg.num_experts)
        experts = _expert_sources(ckpt, f"{p}.mlp", cfg.num_experts, D, cfg.moe_intermediate_size, cfg.expert_quant)
        for proj, source in experts.items():
            out[("mlp", "experts", proj)] = source
    else:
        out.update(_mlp_sources(f"{p}.mlp", ("mlp",), D, cfg.intermediate_size))
    return out


def _mlp_sources(prefix: str, path: tuple, D: int, F: int) -> dict[tuple, object]:
    return {path + (proj, "kernel"): linear(f"{prefix}.{proj}.weight", i, o)
            for proj, i, o in (("gate_proj", D, F), ("up_proj", D, F), ("down_proj", F, D))}


def _deepseek_layer_sources(ckpt: Checkpoint, cfg: DeepseekV3Config, layer: int, sparse: bool,
                            prefix: str = "model") -> dict[tuple, object]:
    p = f"{prefix}.layers.{layer}"
    D, H, C = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    a = f"{p}.self_attn"
    out: dict[tuple, object] = {
        ("input_layernorm", "weight"): Tensor(f"{p}.input_layernorm.weight", (D,)),
        ("post_attention_layernorm", "weight"): Tensor(f"{p}.post_attention_layernorm.weight", (D,)),
        ("self_attn", "kv_a_layernorm", "weight"): Tensor(f"{a}.kv_a_layernorm.weight", (C,)),
    }
    projections = [("kv_a_proj_with_mqa", D, C + cfg.qk_rope_head_dim, cfg.attention_bias),
                   ("kv_b_proj", C, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), False),
                   ("o_proj", H * cfg.v_head_dim, D, cfg.attention_bias)]
    if cfg.q_lora_rank is None:
        projections.append(("q_proj", D, H * cfg.qk_head_dim, False))
    else:
        projections += [("q_a_proj", D, cfg.q_lora_rank, cfg.attention_bias),
                        ("q_b_proj", cfg.q_lora_rank, H * cfg.qk_head_dim, False)]
        out[("self_attn", "q_a_layernorm", "weight")] = Tensor(f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,))
    for proj, i, o, bias in projections:
        out[("self_attn", proj, "kernel")] = linear(f"{a}.{proj}.weight", i, o)
        if bias:
            out[("self_attn", proj, "bias")] = Tensor(f"{a}.{proj}.bias", (o,))
    if sparse:
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        out[("mlp", "gate")] = linear(f"{p}.mlp.gate.weight", D, E)
        out[("mlp", "e_score_correction_bias")] = Tensor(f"{p}.mlp.gate.e_score_correction_bias", (E,))
        for proj, source in _expert_sources(ckpt, f"{p}.mlp", E, D, F, cfg.expert_quant).items():
            out[("mlp", "experts", proj)] = source
        if cfg.n_shared_experts:
            out.update(_mlp_sources(f"{p}.mlp.shared_experts", ("mlp", "shared_experts"), D, F * cfg.n_shared_experts))
    else:
        out.update(_mlp_sources(f"{p}.mlp", ("mlp",), D, cfg.intermediate_size))
    return out


def weight_table(ckpt: Checkpoint, cfg, segment_layout, prefix: str = "model") -> dict[tuple, object]:
    """Every parameter path of the model -> its checkpoint source."""
    if isinstance(cfg, Qwen3VLMoeConfig):
        table = {("language_model",) + path: source for path, source in
                 weight_table(ckpt, cfg.text, segment_layout, prefix="model.language_model").items()}
        table.update({("visual",) + path: source for path, source in _vision_sources(cfg.vision).items()})
        return table
    layer_sources = _deepseek_layer_sources if isinstance(cfg, DeepseekV3Config) else _layer_sources
    D, V = cfg.hidden_size, cfg.vocab_size
    table: dict[tuple, object] = {
        ("embed_tokens",): Tensor(f"{prefix}.embed_tokens.weight", (V, D)),
        ("norm", "weight"): Tensor(f"{prefix}.norm.weight", (D,)),
    }
    if not cfg.tie_word_embeddings:
        table[("lm_head", "kernel")] = linear("lm_head.weight", D, V)
    for s, (first, count, sparse) in enumerate(segment_layout):
        per_layer = [layer_sources(ckpt, cfg, layer, sparse, prefix) for layer in range(first, first + count)]
        for key in per_layer[0]:
            table[("segments", s) + key] = Stacked(tuple(layer[key] for layer in per_layer))
    return table


def _vision_sources(cfg: VisionConfig) -> dict[tuple, object]:
    """The Qwen3-VL vision tower: the Conv3d patch embedding is one matmul over the (C, T, p, p) vector."""
    D, F, p = cfg.hidden_size, cfg.intermediate_size, "model.visual"
    patch = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    patch_dim = int(np.prod(patch))
    out: dict[tuple, object] = {
        ("patch_embed", "kernel"): Tensor(f"{p}.patch_embed.proj.weight", (D,) + patch, reshape=(D, patch_dim),
                                          perm=(1, 0)),
        ("patch_embed", "bias"): Tensor(f"{p}.patch_embed.proj.bias", (D,)),
        ("pos_embed",): Tensor(f"{p}.pos_embed.weight", (cfg.num_position_embeddings, D)),
    }

    def dense(name, i, o):
        return {"kernel": linear(f"{name}.weight", i, o), "bias": Tensor(f"{name}.bias", (o,))}

    def norm(name, dim):
        return {"weight": Tensor(f"{name}.weight", (dim,)), "bias": Tensor(f"{name}.bias", (dim,))}

    def block(i):
        b = f"{p}.blocks.{i}"
        parts = {"norm1": norm(f"{b}.norm1", D), "norm2": norm(f"{b}.norm2", D),
                 "qkv": dense(f"{b}.attn.qkv", D, 3 * D), "proj": dense(f"{b}.attn.proj", D, D),
                 "linear_fc1": dense(f"{b}.mlp.linear_fc1", D, F), "linear_fc2": dense(f"{b}.mlp.linear_fc2", F, D)}
        return {(module, leaf): src for module, leaves in parts.items() for leaf, src in leaves.items()}

    def merger(name, postshuffle):
        merged = D * cfg.spatial_merge_size ** 2
        parts = {"norm": norm(f"{name}.norm", merged if postshuffle else D),
                 "linear_fc1": dense(f"{name}.linear_fc1", merged, merged),
                 "linear_fc2": dense(f"{name}.linear_fc2", merged, cfg.out_hidden_size)}
        return {(module, leaf): src for module, leaves in parts.items() for leaf, src in leaves.items()}

    blocks = [block(i) for i in range(cfg.depth)]
    out.update({("blocks",) + key: Stacked(tuple(b[key] for b in blocks)) for key in blocks[0]})
    out.update({("merger",) + key: src for key, src in merger(f"{p}.merger", False).items()})
    if cfg.deepstack_visual_indexes:
        ds = [merger(f"{p}.deepstack_merger_list.{i}", True) for i in range(len(cfg.deepstack_visual_indexes))]
        out.update({("deepstack_merger_list",) + key: Stacked(tuple(m[key] for m in ds)) for key in ds[0]})
    return out


def _optional_tensors(ckpt: Checkpoint, cfg) -> set[str]:
    """Tensors a checkpoint may carry that we do not use: a tied lm_head, DeepSeek's multi-token-prediction
    layers (numbered after the last decoder layer)."""
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    layer_re = re.compile(r"model\.layers\.(\d+)\.")
    for name in ckpt.names():
        m = layer_re.match(name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers and isinstance(cfg, DeepseekV3Config):
            optional.add(name)
    return optional


def _check_tensors(ckpt: Checkpoint, table: dict, optional: set[str]) -> None:
    used = set()
    for source in table.values():
        for leaf in source.leaves():
            if leaf.name not in ckpt:
                raise CheckpointError(f"{ckpt.dir}: missing tensor {leaf.name!r} (expected shape "
                                      f"{list(leaf.hf_shape)})")
            if ckpt.shape(leaf.name) != leaf.hf_shape:
                raise CheckpointError(f"tensor {leaf.name!r}: expected shape {list(leaf.hf_shape)}, found "
                                      f"{list(ckpt.shape(leaf.name))}")
            used.add(leaf.name)
    for name in ckpt.names():
        if name not in used and name not in optional and not any(p.match(name) for p in IGNORED):
            raise CheckpointError(f"{ckpt.dir}: unexpected tensor {name!r} of shape {list(ckpt.shape(name))}")


def load_hf_model(model_dir: str | Path, *, dtype: str | None = None, lora=None, moe_impl: str | None = None,
                  shardings=None, quantized_experts: bool = True):
    """A model with the weights of a Hugging Face folder. `shardings` (optional) maps parameter paths to
    `jax.sharding.Sharding`s; by default everything goes to the first device. Quantized routed experts (4-bit
    in Kimi K2 Thinking, FP8 in Kimi K2 Instruct and DeepSeek-V3) stay quantized in memory unless
    `quantized_experts=False`, which dequantizes them to `dtype` on load like every other weight."""
    cfg = load_config(model_dir)
    ckpt = open_checkpoint(model_dir, getattr(cfg, "quantization_config", None))
    if not quantized_experts and getattr(cfg, "expert_quant", None):
        cfg = with_quantization_config(cfg, None)  # the model then holds them as floats
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, lora=lora, dtype=dtype, moe_impl=moe_impl))
    table = weight_table(ckpt, cfg, abstract.segment_layout)
    _check_tensors(ckpt, table, optional=_optional_tensors(ckpt, cfg))

    graphdef, state = nnx.split(abstract)
    default_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        sharding = (shardings or {}).get(path, default_sharding)
        shape, dt = var.get_value().shape, var.get_value().dtype
        if isinstance(var, (LoRAParam, LoRAScale)):
            # created in place with its sharding: a full-size expert LoRA tensor would not fit one device
            var.set_value(jax.jit(lambda s=shape, d=dt: jnp.zeros(s, d), out_shardings=sharding)())
            continue
        source = table.get(path)
        if source is None:
            raise CheckpointError(f"internal: no checkpoint mapping for parameter {'/'.join(map(str, path))}")
        if source.shape != shape:
            raise CheckpointError(f"internal: mapping for {'/'.join(map(str, path))} gives {source.shape}, "
                                  f"parameter is {shape}")
        var.set_value(jax.make_array_from_callback(
            shape, sharding, lambda index, src=source, d=dt: src.read(ckpt, index).astype(d)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
