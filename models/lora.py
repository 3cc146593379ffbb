"""Multi-adapter LoRA: every LoRA tensor has a leading adapter-slot axis X.

Each sequence carries its slot id; slot 0 is the base model (its scale is 0 and stays 0). A slot has its own
rank (<= the model's `max_rank`) and alpha: columns of A and rows of B beyond the slot's rank are zero, and
since their gradients are then zero too (and AdamW keeps zeros at zero) the rank holds during training. A
fresh adapter is an exact no-op: B = 0, A seeded (PEFT's kaiming-uniform bound 1/sqrt(in_features)).

Groups follow Tinker's `LoraConfig`: `attn` (q/k/v/o), `mlp` (dense MLP, shared and routed experts) and
`unembed` (lm_head). A group switched off at model level has no LoRA tensors at all; switched off for one slot,
that slot's scale for the group is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

GROUPS = ("attn", "mlp", "unembed")


class LoRAParam(nnx.Param):
    """Trainable LoRA factor (A or B)."""


class LoRAScale(nnx.Variable):
    """Per-slot alpha / rank (0 for the base slot and for groups a slot does not train). Not trainable."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    num_slots: int = 4  # X, including slot 0 (the base model)
    max_rank: int = 32
    attn: bool = True
    mlp: bool = True
    unembed: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_slots < 2:
            raise ValueError(f"LoraConfig.num_slots must be >= 2 (slot 0 is the base model), got {self.num_slots}")
        if self.max_rank < 1:
            raise ValueError(f"LoraConfig.max_rank must be >= 1, got {self.max_rank}")

    def enabled(self, group: str) -> bool:
        return getattr(self, group)


class LoRA(nnx.Module):
    """Low-rank delta for a dense linear layer: y += scale[x] * (x @ A[x]) @ B[x], per sequence slot x."""

    def __init__(self, in_features: int, out_features: int, cfg: LoraConfig, group: str, *, in_axis, out_axis):
        X, R, dt = cfg.num_slots, cfg.max_rank, jnp.dtype(cfg.dtype)
        self.group = group
        self.lora_a = LoRAParam(jnp.zeros((X, in_features, R), dt), axes=("adapter", in_axis, "rank"))
        self.lora_b = LoRAParam(jnp.zeros((X, R, out_features), dt), axes=("adapter", "rank", out_axis))
        self.lora_scale = LoRAScale(jnp.zeros((X,), jnp.float32), axes=("adapter",))

    def __call__(self, x_BTD, adapter_ids_B):
        a_BDR = self.lora_a[...][adapter_ids_B].astype(x_BTD.dtype)
        b_BRF = self.lora_b[...][adapter_ids_B].astype(x_BTD.dtype)
        scale_B = self.lora_scale[...][adapter_ids_B]  # fp32: alpha/rank is not rounded to bf16
        h_BTR = (jnp.einsum("BTD,BDR->BTR", x_BTD, a_BDR).astype(jnp.float32)
                 * scale_B[:, None, None]).astype(x_BTD.dtype)
        return jnp.einsum("BTR,BRF->BTF", h_BTR, b_BRF)


class ExpertLoRA(nnx.Module):
    """LoRA factors for routed experts: A [X, E, D, R], B [X, E, R, F]; applied inside the grouped matmul."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, cfg: LoraConfig, *, in_axis, out_axis):
        X, R, dt = cfg.num_slots, cfg.max_rank, jnp.dtype(cfg.dtype)
        self.group = "mlp"
        self.lora_a = LoRAParam(jnp.zeros((X, num_experts, in_features, R), dt),
                                axes=("adapter", "expert", in_axis, "rank"))
        self.lora_b = LoRAParam(jnp.zeros((X, num_experts, R, out_features), dt),
                                axes=("adapter", "expert", "rank", out_axis))
        self.lora_scale = LoRAScale(jnp.zeros((X,), jnp.float32), axes=("adapter",))


class SlotAxes(dict):
    """State path -> the adapter-slot axis X of the LoRA factor or scale there. Hashable by its items, so jitted
    functions take it as a static argument; never mutated after `slot_axes` builds it."""

    def __hash__(self):
        return hash(frozenset(self.items()))


def slot_axes(model: nnx.Module) -> SlotAxes:
    """Where the slot axis sits in each LoRA factor and scale of `model`, read from its `axes` metadata (inside
    stacked layers it follows the layer axis). Every user of raw LoRA arrays (optimizer, checkpoints, sampler,
    tests) takes its axes from here."""
    state = nnx.state(model, nnx.Any(LoRAParam, LoRAScale))
    return SlotAxes({path: var.get_metadata("axes").index("adapter") for path, var in nnx.to_flat_state(state)})


def lora_modules(model: nnx.Module):
    """(path, module) for every LoRA / ExpertLoRA module in the model."""
    return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, (LoRA, ExpertLoRA))]


def init_adapter_slot(model: nnx.Module, slot: int, *, rank: int, alpha: float, seed: int,
                      train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = True) -> None:
    """Start `slot` as a fresh adapter: A seeded in the first `rank` columns, B = 0, scale alpha/rank per group.

    A depends only on (seed, module path), so the same seed gives the same adapter in any slot.
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("this model was built without LoRA (lora=None)")
    X, R = mods[0][1].lora_scale.shape[-1], mods[0][1].lora_a.shape[-1]
    if not 1 <= slot < X:
        raise ValueError(f"adapter slot must be in [1, {X - 1}] (slot 0 is the base model), got {slot}")
    if not 1 <= rank <= R:
        raise ValueError(f"LoRA rank must be in [1, {R}] (the model's max_rank), got {rank}")
    wanted = {"attn": train_attn, "mlp": train_mlp, "unembed": train_unembed}
    for path, mod in mods:
        axis = mod.lora_a.get_metadata("axes").index("adapter")
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(map(str, path)).encode()))
        scale = alpha / rank if wanted[mod.group] else 0.0
        mod.lora_a[...], mod.lora_b[...], mod.lora_scale[...] = _fresh_slot(
            mod.lora_a[...], mod.lora_b[...], mod.lora_scale[...], key, slot, rank, scale, slot_axis=axis)


@functools.partial(jax.jit, static_argnames=("slot_axis",))
def _fresh_slot(a, b, scale, key, slot, rank, scale_value, *, slot_axis: int):
    """One module's factors with `slot` reset: A ~ U(+-1/sqrt(in)) in its first `rank` columns, B = 0."""
    a_shape = a.shape[:slot_axis] + a.shape[slot_axis + 1:]
    bound = 1.0 / np.sqrt(a_shape[-2])
    fresh_a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    fresh_a = jnp.where(jnp.arange(a.shape[-1]) < rank, fresh_a, 0.0).astype(a.dtype)
    put = lambda x, value: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
        x, jnp.broadcast_to(value, x.shape[:slot_axis] + x.shape[slot_axis + 1:]).astype(x.dtype), slot, slot_axis)
    return put(a, fresh_a), put(b, 0.0), put(scale, scale_value)
