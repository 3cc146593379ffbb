"""Model construction from presets (random weights) or Hugging Face folders (their weights), and parameter
counts from shapes."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import config_from_hf_dict
from models.families import model_class
from models.hf_loading import load_hf_model


def preset_config(name: str):
    from configs import load_preset

    return config_from_hf_dict(load_preset(name)["hf_config"], source=f"preset {name}")


def create_model(cfg, *, seed: int = 0, **kwargs):
    """A randomly initialised model (tiny presets and tests). Initialisation is one compiled program, cached
    per config, so a second model of the same config costs no compile."""
    graphdef, init = _compiled_init(cfg, tuple(sorted(kwargs.items())))
    return nnx.merge(graphdef, init(jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _compiled_init(cfg, kwargs: tuple):
    build = lambda key: model_class(cfg)(cfg, rngs=nnx.Rngs(key), **dict(kwargs))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(build, jax.random.key(0)))
    return graphdef, jax.jit(lambda key: nnx.split(build(key))[1])


def create_abstract_model(cfg, **kwargs):
    """Shapes and dtypes only: a full-size model on a laptop in seconds."""
    return nnx.eval_shape(lambda: model_class(cfg)(cfg, **kwargs))


def load_model(spec: str, **kwargs):
    """A preset name (random weights) or a local Hugging Face folder (its weights)."""
    if Path(spec).is_dir():
        return load_hf_model(spec, **kwargs)
    return create_model(preset_config(spec), **kwargs)


def parameter_counts(model) -> dict:
    """Base parameters (total, routed experts, active per token), their bytes, and LoRA parameters per adapter
    slot at the model's max rank. 4-bit routed experts count as the weights they stand for (8 per packed word;
    their scales are not parameters), and as their real bytes. Works on abstract models (shapes only)."""
    from models.layers.quantized import NIBBLES
    from models.lora import LoRAParam, lora_modules

    cfg = model.config
    total = routed = weight_bytes = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))):
        value = var.get_value()
        size = int(math.prod(value.shape))
        weight_bytes += size * jnp.dtype(value.dtype).itemsize
        expert = len(path) >= 2 and path[-2] == "experts"
        if expert and str(path[-1]).endswith("_scale"):
            continue
        if expert and jnp.issubdtype(value.dtype, jnp.integer):
            size *= NIBBLES
        total += size
        if expert and path[-1] in ("gate_proj", "up_proj", "down_proj"):
            routed += size
    active = total - routed * (1 - cfg.num_experts_per_tok / cfg.num_experts) if cfg.num_experts else total
    lora = sum(int(math.prod(m.lora_a.shape)) + int(math.prod(m.lora_b.shape)) for _, m in lora_modules(model))
    slots = lora_modules(model)[0][1].lora_scale.shape[-1] if lora else 1
    return {"total": total, "routed_experts": routed, "active": int(active), "lora_per_adapter": lora // slots,
            "weight_bytes": weight_bytes}
