"""Rotary position embeddings: default, YaRN and interleaved multimodal (M-RoPE) variants.

Frequencies are computed the way transformers does (fp32 `base ** (arange(0, d, 2) / d)`, fp32 position x
frequency product), and cos/sin are cast to the activation dtype, so fp32 runs match to ~1e-7.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """The `rope_parameters` of a Hugging Face config, typed."""

    rope_type: str = "default"  # "default" | "yarn"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    mrope_section: tuple[int, ...] | None = None  # M-RoPE: frequency slots for (T, H, W)

    @classmethod
    def from_hf(cls, params: dict, max_position_embeddings: int) -> "RopeConfig":
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"config.json: rope_type {rope_type!r} is not supported; expected 'default' or 'yarn'")
        section = params.get("mrope_section")
        original = params.get("original_max_position_embeddings")
        if rope_type == "yarn" and original is None:
            original = max_position_embeddings
        return cls(
            rope_type=rope_type,
            theta=float(params.get("rope_theta", 10000.0)),
            factor=params.get("factor"),
            original_max_position_embeddings=original,
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            mrope_section=tuple(section) if section else None,
        )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(cfg: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] (fp32) and the factor applied to cos/sin."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(cfg.theta), exponents, dtype=np.float32)
    if cfg.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0

    factor = cfg.factor
    original = cfg.original_max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = cfg.attention_factor
    if attention_factor is None:
        if cfg.mscale and cfg.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = cfg.beta_fast or 32
    beta_slow = cfg.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    inv_extrapolation = np.float32(1.0) / pos_freqs
    inv_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions, inv_freq: np.ndarray, attention_factor: float, dtype, mrope_section=None):
    """cos, sin of shape [B, T, K] for `positions` [B, T] (or [3, B, T] with `mrope_section` for M-RoPE).

    M-RoPE is interleaved as in Qwen3-VL: frequency slot j takes the temporal position by default; slots
    1::3 up to 3*section[1] take height and slots 2::3 up to 3*section[2] take width.
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if mrope_section is None:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    else:
        freqs_3 = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, K/2]
        slot = np.arange(inv_freq.shape[0])
        axis = np.zeros_like(slot)
        for dim_index, offset in ((1, 1), (2, 2)):
            axis[(slot % 3 == offset) & (slot < 3 * mrope_section[dim_index])] = dim_index
        freqs = jnp.take_along_axis(freqs_3, jnp.asarray(axis)[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb) * attention_factor
    sin = jnp.sin(emb) * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BTHK, cos_BTK, sin_BTK):
    """Rotate-half rope on [B, T, heads, K], with cos/sin broadcast over heads."""
    cos, sin = cos_BTK[:, :, None, :], sin_BTK[:, :, None, :]
    return x_BTHK * cos + rotate_half(x_BTHK) * sin


def apply_rope_interleaved(x_BTHK, cos_BTK, sin_BTK):
    """DeepSeek's interleaved rope: pairs (x0, x1), (x2, x3), ... rotate by one frequency each, and the result
    is laid out de-interleaved (evens then odds), as transformers does for q and k alike."""
    half = cos_BTK.shape[-1] // 2
    cos, sin = cos_BTK[:, :, None, :half], sin_BTK[:, :, None, :half]
    x1, x2 = x_BTHK[..., 0::2], x_BTHK[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
