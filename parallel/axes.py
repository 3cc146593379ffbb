"""Logical axis names and the rules table that maps them to mesh axes.

Every parameter in `models/` carries a tuple of logical axis names (metadata key `axes`); changing the parallel
layout means changing this table, not model code.
"""

from __future__ import annotations

from collections.abc import Mapping

# Logical axes used by model parameters and activations.
LOGICAL_AXES = (
    "layers",  # stacked (scanned) layers
    "batch",
    "length",
    "embed",  # model width D
    "heads",  # query heads H
    "kv_heads",  # key/value heads G
    "head_dim",  # K
    "mlp",  # dense MLP hidden F
    "expert",  # E
    "expert_mlp",  # expert hidden F
    "vocab",  # V
    "adapter",  # LoRA adapter slots X
    "rank",  # LoRA rank R
    "norm",  # vectors of norm weights
    "q_lora",  # MLA query down-projection width
    "kv_lora",  # MLA key/value latent width C (+ the shared rope key)
)

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "batch": ("data", "fsdp", "expert"),  # outside the MoE the expert axis is one more data axis
    "length": "sequence",
    "embed": ("fsdp", "expert"),  # FSDP: non-expert weights shard over every non-tensor axis
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "vocab": "tensor",
    "adapter": None,
    "rank": None,
    "norm": None,
    "q_lora": None,
    "kv_lora": None,
}
