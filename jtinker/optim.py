"""AdamW with PyTorch semantics, per adapter slot, over LoRA tensors that carry a slot axis.

Tinker's `AdamParams(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)` behave like
`torch.optim.AdamW` after `torch.nn.utils.clip_grad_norm_` (0 disables clipping): decoupled weight decay
p *= 1 - lr*wd, bias-corrected moments, p -= lr * m_hat / (sqrt(v_hat) + eps). Only the stepping slot's
slice of each tensor changes; every other slot's weights and moments are left bit for bit as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from models.lora import SlotAxes


@dataclasses.dataclass(frozen=True)
class AdamParams:
    """Tinker's defaults."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


def check_adam_params(params: AdamParams) -> None:
    """Raise a one-line ValueError for hyperparameters that would silently corrupt the slot (a NaN or negative
    learning rate steps every weight to NaN or uphill); called before a step changes anything. The rules hold for
    the float32 values the step uses too: beta1 = 0.99999999 rounds to 1 (bias correction 1/0), eps = 1e-46 to 0."""
    rules = {"learning_rate": ("finite and >= 0", lambda v: 0 <= v < math.inf),
             "beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
             "eps": ("finite and > 0", lambda v: 0 < v < math.inf),
             "weight_decay": ("finite and >= 0", lambda v: 0 <= v < math.inf),
             "grad_clip_norm": ("finite and >= 0 (0 disables clipping)", lambda v: 0 <= v < math.inf)}
    for name, (rule, ok) in rules.items():
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
            raise ValueError(f"AdamParams.{name} must be {rule}, got {value!r}"[:200])
        with np.errstate(over="ignore"):
            rounded = float(np.float32(value))
        if not ok(rounded):
            raise ValueError(f"AdamParams.{name} must be {rule} in float32, the step's precision; {value!r} rounds "
                             f"to {rounded!r}"[:200])


def init_state(lora_params: dict, slot_axes: SlotAxes) -> dict:
    """Zero moments and a per-slot step count. `lora_params` maps paths to arrays."""
    num_slots = {p: a.shape[slot_axes[p]] for p, a in lora_params.items()}
    X = max(num_slots.values())
    return {"m": {p: jnp.zeros_like(a, jnp.float32) for p, a in lora_params.items()},
            "v": {p: jnp.zeros_like(a, jnp.float32) for p, a in lora_params.items()},
            "step": jnp.zeros((X,), jnp.int32)}


def slot_mask(axis: int, array, slot):
    """Broadcastable boolean mask selecting `slot` along a LoRA tensor's slot axis `axis`."""
    shape = [1] * array.ndim
    shape[axis] = array.shape[axis]
    return (jnp.arange(array.shape[axis]) == slot).reshape(shape)


def slot_grad_norm(grads: dict, slot, slot_axes: SlotAxes) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.where(slot_mask(slot_axes[p], g, slot), jnp.square(g.astype(jnp.float32)), 0.0))
                        for p, g in grads.items()))


@functools.partial(jax.jit, static_argnames=("slot_axes",))
def adamw_step(params: dict, grads: dict, state: dict, slot, hp: dict, *, slot_axes: SlotAxes):
    """One AdamW step of slot `slot`. `hp` holds the AdamParams fields as scalars (traced, so changing the
    learning rate never recompiles). Returns (params, state, metrics)."""
    norm = slot_grad_norm(grads, slot, slot_axes)
    clip = hp["grad_clip_norm"]
    scale = jnp.where((clip > 0) & (norm > clip), clip / (norm + 1e-6), 1.0)
    step = state["step"][slot] + 1
    bias1 = 1 - hp["beta1"] ** step
    bias2 = 1 - hp["beta2"] ** step
    new_params, new_m, new_v = {}, {}, {}
    for path, p in params.items():
        mask = slot_mask(slot_axes[path], p, slot)
        g = grads[path].astype(jnp.float32) * scale
        m = hp["beta1"] * state["m"][path] + (1 - hp["beta1"]) * g
        v = hp["beta2"] * state["v"][path] + (1 - hp["beta2"]) * jnp.square(g)
        p32 = p.astype(jnp.float32) * (1 - hp["learning_rate"] * hp["weight_decay"])
        p32 = p32 - hp["learning_rate"] / bias1 * m / (jnp.sqrt(v) / jnp.sqrt(bias2) + hp["eps"])
        new_params[path] = jnp.where(mask, p32.astype(p.dtype), p)
        new_m[path] = jnp.where(mask, m, state["m"][path])
        new_v[path] = jnp.where(mask, v, state["v"][path])
    new_state = {"m": new_m, "v": new_v, "step": state["step"].at[slot].set(step)}
    return new_params, new_state, {"grad_norm": norm, "clip_scale": scale}


def hyperparameters(params: AdamParams) -> dict:
    return {f.name: jnp.float32(getattr(params, f.name)) for f in dataclasses.fields(params)}
