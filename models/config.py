"""Typed model configs read from a Hugging Face `config.json` (or a preset), with one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from models.layers.quantized import ExpertQuant
from models.layers.rope import RopeConfig

_MISSING = object()
# transformers 5 writes some fields under another name (its `attribute_map`).
ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts"}


class ConfigError(ValueError):
    """A malformed config: the message is one line naming the field, what was expected and what was found."""


def _field(raw: dict, name: str, kind, default=_MISSING, source: str = "config.json"):
    value = raw.get(name, raw.get(ALIASES.get(name, ""), default))
    if value is _MISSING:
        raise ConfigError(f"{source}: missing field {name!r} (expected {kind.__name__})")
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: field {name!r} expected {kind.__name__}, found {value!r}")
    return value


def _positive(source: str, **values):
    for name, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{source}: field {name!r} expected a positive number, found {value!r}")


def expert_quant_of(quantization_config: dict | None) -> ExpertQuant | None:
    """How a checkpoint's routed experts are quantized, which is how the model keeps them in memory: 4-bit
    (compressed-tensors `pack-quantized`, as in Kimi K2 Thinking) or FP8 with block scales (Kimi K2 Instruct,
    DeepSeek-V3, Qwen3's FP8 releases). None: plain floats."""
    q = quantization_config or {}
    if q.get("quant_method") == "fp8":
        return ExpertQuant("fp8", block=tuple(int(b) for b in (q.get("weight_block_size") or (128, 128))))
    if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
        return None
    for group in (q.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("num_bits") == 4:
            return ExpertQuant("int4", group=int(weights.get("group_size") or 32))
    return None


class _QuantizedExperts:
    """A text config's `expert_quant`, read from its `quantization_config` field."""

    @property
    def expert_quant(self) -> ExpertQuant | None:
        return expert_quant_of(self.quantization_config)


def with_quantization_config(cfg, quantization_config: dict | None):
    """`cfg` with another `quantization_config` (a Qwen3-VL config's lives on its language model)."""
    if hasattr(cfg, "text"):
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, quantization_config=quantization_config))
    return dataclasses.replace(cfg, quantization_config=quantization_config)


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(_QuantizedExperts):
    """Qwen3-MoE text decoder (`model_type` "qwen3_moe"); also the language model of Qwen3-VL-MoE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    quantization_config: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    model_type: str = "qwen3_moe"
    moe_impl: str = "auto"  # how routed experts multiply (models/layers/moe_impl.py): a built model's config says
    #                         what it resolved to
    segment_boundaries: tuple[int, ...] = ()  # extra scan-segment breaks (Qwen3-VL: where DeepStack stops)

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "Qwen3MoeConfig":
        f = lambda name, kind, default=_MISSING: _field(raw, name, kind, default, source)  # noqa: E731
        hidden, heads = f("hidden_size", int), f("num_attention_heads", int)
        act = f("hidden_act", str, "silu")
        if act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' expected 'silu', found {act!r}")
        if f("use_sliding_window", bool, False):
            raise ConfigError(f"{source}: field 'use_sliding_window' expected false (sliding-window attention is "
                              "not supported), found true")
        max_pos = f("max_position_embeddings", int, 32768)
        head_dim = f("head_dim", int, None) or hidden // heads
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        cfg = cls(
            vocab_size=f("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=f("intermediate_size", int),
            num_hidden_layers=f("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=f("num_key_value_heads", int, heads) or heads,
            head_dim=head_dim,
            moe_intermediate_size=f("moe_intermediate_size", int),
            num_experts=f("num_experts", int),
            num_experts_per_tok=f("num_experts_per_tok", int),
            norm_topk_prob=f("norm_topk_prob", bool, False),
            decoder_sparse_step=f("decoder_sparse_step", int, 1),
            mlp_only_layers=tuple(f("mlp_only_layers", list, []) or []),
            rms_norm_eps=f("rms_norm_eps", float, 1e-6),
            max_position_embeddings=max_pos,
            rope=_rope_from_hf(raw, max_pos, source),
            attention_bias=f("attention_bias", bool, False),
            tie_word_embeddings=f("tie_word_embeddings", bool, False),
            initializer_range=f("initializer_range", float, 0.02),
            dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            quantization_config=raw.get("quantization_config"),
        )
        _positive(source, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  decoder_sparse_step=cfg.decoder_sparse_step)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' expected a divisor of num_attention_heads "
                              f"({cfg.num_attention_heads}), found {cfg.num_key_value_heads}")
        if cfg.num_experts and not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
            raise ConfigError(f"{source}: field 'num_experts_per_tok' expected 1..{cfg.num_experts}, found "
                              f"{cfg.num_experts_per_tok}")
        return cfg

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def layer_kinds(self) -> list[bool]:
        """Sparse (MoE) or dense per layer, by transformers' rule: MoE unless listed in mlp_only_layers or off
        the decoder_sparse_step grid."""
        return [layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0 for layer in range(self.num_hidden_layers)]


def _rope_from_hf(raw: dict, max_pos: int, source: str) -> RopeConfig:
    rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope_params, dict):
        raise ConfigError(f"{source}: field 'rope_parameters' expected an object, found {rope_params!r}")
    return RopeConfig.from_hf({"rope_theta": raw.get("rope_theta", 10000.0), **rope_params}, max_pos)


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(_QuantizedExperts):
    """DeepSeek-V3 architecture (`model_type` "deepseek_v3"; Kimi K2's "kimi_k2" is the same model): multi-head
    latent attention, sigmoid group-limited routing with a selection-only bias, shared experts, leading dense
    layers."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    num_nextn_predict_layers: int = 0
    quantization_config: dict | None = dataclasses.field(default=None, compare=False, hash=False)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    moe_impl: str = "auto"  # how routed experts multiply (models/layers/moe_impl.py): a built model's config says
    #                         what it resolved to

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "DeepseekV3Config":
        f = lambda name, kind, default=_MISSING: _field(raw, name, kind, default, source)  # noqa: E731
        act = f("hidden_act", str, "silu")
        if act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' expected 'silu', found {act!r}")
        heads = f("num_attention_heads", int)
        kv_heads = f("num_key_value_heads", int, heads) or heads
        if kv_heads != heads:  # MLA expands every head from the latent; transformers cannot run this either
            raise ConfigError(f"{source}: field 'num_key_value_heads' expected {heads} (= num_attention_heads, "
                              f"as multi-head latent attention requires), found {kv_heads}")
        max_pos = f("max_position_embeddings", int, 4096)
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        cfg = cls(
            vocab_size=f("vocab_size", int), hidden_size=f("hidden_size", int),
            intermediate_size=f("intermediate_size", int), moe_intermediate_size=f("moe_intermediate_size", int),
            num_hidden_layers=f("num_hidden_layers", int), num_attention_heads=heads,
            n_shared_experts=f("n_shared_experts", int, 0) or 0, n_routed_experts=f("n_routed_experts", int),
            num_experts_per_tok=f("num_experts_per_tok", int), n_group=f("n_group", int, 1) or 1,
            topk_group=f("topk_group", int, 1) or 1, first_k_dense_replace=f("first_k_dense_replace", int, 0) or 0,
            norm_topk_prob=f("norm_topk_prob", bool, True),
            routed_scaling_factor=f("routed_scaling_factor", float, 1.0),
            q_lora_rank=f("q_lora_rank", int, None), kv_lora_rank=f("kv_lora_rank", int),
            qk_nope_head_dim=f("qk_nope_head_dim", int), qk_rope_head_dim=f("qk_rope_head_dim", int),
            v_head_dim=f("v_head_dim", int), rope_interleave=f("rope_interleave", bool, True),
            rms_norm_eps=f("rms_norm_eps", float, 1e-6), max_position_embeddings=max_pos,
            rope=_rope_from_hf(raw, max_pos, source), attention_bias=f("attention_bias", bool, False),
            tie_word_embeddings=f("tie_word_embeddings", bool, False),
            initializer_range=f("initializer_range", float, 0.02), dtype=str(dtype),
            num_nextn_predict_layers=f("num_nextn_predict_layers", int, 0) or 0,
            quantization_config=raw.get("quantization_config"),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"), model_type=raw.get("model_type", "deepseek_v3"),
        )
        _positive(source, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads, kv_lora_rank=cfg.kv_lora_rank,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                  n_routed_experts=cfg.n_routed_experts)
        E, G = cfg.n_routed_experts, cfg.n_group
        if E % G or (G > 1 and E // G < 2):
            raise ConfigError(f"{source}: field 'n_group' expected a divisor of n_routed_experts ({E}) leaving at "
                              f"least 2 experts per group, found {G}")
        if not 1 <= cfg.topk_group <= G:
            raise ConfigError(f"{source}: field 'topk_group' expected 1..{G} (n_group), found {cfg.topk_group}")
        if not 1 <= cfg.num_experts_per_tok <= E * cfg.topk_group // G:
            raise ConfigError(f"{source}: field 'num_experts_per_tok' expected 1..{E * cfg.topk_group // G} "
                              f"(experts in topk_group groups), found {cfg.num_experts_per_tok}")
        return cfg

    @property
    def num_experts(self) -> int:
        return self.n_routed_experts

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 (folded in here, not into cos/sin)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            factor = self.rope.factor
            mscale = 1.0 if factor <= 1 else 0.1 * self.rope.mscale_all_dim * math.log(factor) + 1.0
            scale *= mscale * mscale
        return scale

    def layer_kinds(self) -> list[bool]:
        return [layer >= self.first_k_dense_replace for layer in range(self.num_hidden_layers)]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen3-VL vision tower."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, raw: dict, source: str) -> "VisionConfig":
        f = lambda name, kind, default=_MISSING: _field(raw, name, kind, default, source)  # noqa: E731
        act = f("hidden_act", str, "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"{source}: field 'vision_config.hidden_act' expected 'gelu_pytorch_tanh', found {act!r}")
        cfg = cls(depth=f("depth", int), hidden_size=f("hidden_size", int),
                  intermediate_size=f("intermediate_size", int), num_heads=f("num_heads", int),
                  out_hidden_size=f("out_hidden_size", int),
                  num_position_embeddings=f("num_position_embeddings", int),
                  deepstack_visual_indexes=tuple(f("deepstack_visual_indexes", list, [])),
                  in_channels=f("in_channels", int, 3), patch_size=f("patch_size", int, 16),
                  temporal_patch_size=f("temporal_patch_size", int, 2),
                  spatial_merge_size=f("spatial_merge_size", int, 2),
                  rope_theta=float((raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                  initializer_range=f("initializer_range", float, 0.02))
        side = math.isqrt(cfg.num_position_embeddings)
        if side * side != cfg.num_position_embeddings:
            raise ConfigError(f"{source}: field 'vision_config.num_position_embeddings' expected a square, found "
                              f"{cfg.num_position_embeddings}")
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ConfigError(f"{source}: field 'vision_config.num_heads' expected a divisor of hidden_size "
                              f"({cfg.hidden_size}) giving a head size divisible by 4, found {cfg.num_heads}")
        if any(not 0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
            raise ConfigError(f"{source}: field 'vision_config.deepstack_visual_indexes' expected indexes below depth "
                              f"({cfg.depth}), found {list(cfg.deepstack_visual_indexes)}")
        return cfg


@dataclasses.dataclass(frozen=True)
class Qwen3VLMoeConfig:
    """Qwen3-VL-MoE (`model_type` "qwen3_vl_moe"): a vision tower feeding the Qwen3-MoE decoder, whose router
    always renormalises its top-k and whose rope is interleaved M-RoPE."""

    text: Qwen3MoeConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = "qwen3_vl_moe"

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "Qwen3VLMoeConfig":
        for key in ("text_config", "vision_config"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"{source}: missing field {key!r} (expected an object)")
        dtype = raw.get("dtype") or raw.get("torch_dtype") or raw["text_config"].get("dtype") or "bfloat16"
        vision = VisionConfig.from_hf(raw["vision_config"], f"{source} vision_config")
        text_raw = {**raw["text_config"], "dtype": dtype, "norm_topk_prob": True,  # the VL router ignores the flag
                    "tie_word_embeddings": raw.get("tie_word_embeddings", False),
                    "quantization_config": raw.get("quantization_config") or raw["text_config"].get(
                        "quantization_config")}
        text = Qwen3MoeConfig.from_hf(text_raw, f"{source} text_config")
        if text.rope.mrope_section is None or sum(text.rope.mrope_section) != text.head_dim // 2:
            raise ConfigError(f"{source}: field 'text_config.rope_parameters.mrope_section' expected sections summing "
                              f"to head_dim/2 ({text.head_dim // 2}), found {text.rope.mrope_section}")
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(f"{source}: field 'vision_config.out_hidden_size' expected {text.hidden_size} (the text "
                              f"hidden size), found {vision.out_hidden_size}")
        text = dataclasses.replace(text, segment_boundaries=(len(vision.deepstack_visual_indexes),))
        return cls(text=text, vision=vision, image_token_id=raw.get("image_token_id", 151655),
                   video_token_id=raw.get("video_token_id", 151656),
                   vision_start_token_id=raw.get("vision_start_token_id", 151652),
                   vision_end_token_id=raw.get("vision_end_token_id", 151653))

    def __getattr__(self, name):  # vocab_size, num_experts, dtype, ...: the language model's
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.text, name)


CONFIG_CLASSES: dict[str, type] = {"qwen3_moe": Qwen3MoeConfig, "deepseek_v3": DeepseekV3Config,
                                   "kimi_k2": DeepseekV3Config, "qwen3_vl_moe": Qwen3VLMoeConfig}


def unwrap_text_config(raw: dict) -> dict:
    """Kimi K2.5 / K2.6 wrap the K2 text config in `text_config`; return it as a `kimi_k2` config, keeping a
    top-level `quantization_config`. Other configs come back unchanged."""
    if raw.get("model_type") == "kimi_k25" and isinstance(raw.get("text_config"), dict):
        text = {**raw["text_config"], "model_type": "kimi_k2"}
        if raw.get("quantization_config") and not text.get("quantization_config"):
            text["quantization_config"] = raw["quantization_config"]
        return text
    return raw


def config_from_hf_dict(raw: dict, source: str = "config.json"):
    raw = unwrap_text_config(raw)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"{source}: unknown model_type {model_type!r}; supported: {', '.join(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[model_type].from_hf(raw, source)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_config(model_dir: str | Path):
    return config_from_hf_dict(read_hf_config(model_dir), str(Path(model_dir) / "config.json"))
