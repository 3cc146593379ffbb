"""The model family of each Hugging Face `model_type`: what both building (`registry`) and loading
(`hf_loading`) instantiate."""

from __future__ import annotations

from models.deepseek_v3 import DeepseekV3ForCausalLM
from models.qwen3_moe import Qwen3MoeForCausalLM
from models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

MODEL_CLASSES = {"qwen3_moe": Qwen3MoeForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM,
                 "kimi_k2": DeepseekV3ForCausalLM, "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}


def model_class(cfg):
    """The model class for a config (`cfg.model_type`)."""
    return MODEL_CLASSES[cfg.model_type]
