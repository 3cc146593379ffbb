"""Training state of one adapter slot on disk (Orbax): its LoRA factors, its per-group scales (rank/alpha),
its AdamW moments and step. Restoring into any slot of a trainer with the same model continues training bit
for bit, with or without the optimizer state."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jtinker.optim import slot_mask
from jtinker.trainer import Trainer
from models.lora import LoRAScale, slot_axis


def _key(path) -> str:
    return "/".join(map(str, path))


def _take(path, array, slot):
    return np.asarray(jnp.take(array, slot, axis=slot_axis(path)))


def _put(path, array, slot, value):
    return jax.lax.dynamic_update_index_in_dim(array, jnp.asarray(value, array.dtype), slot, slot_axis(path))


def _scales(trainer: Trainer):
    return {path: var for path, var in nnx.to_flat_state(trainer.base) if isinstance(var, LoRAScale)}


def slot_state(trainer: Trainer, slot: int, with_optimizer: bool = True) -> dict:
    """The slot's adapter (factors and scales) and, with the optimizer, its AdamW moments and step."""
    state = {
        "lora": {_key(p): _take(p, a, slot) for p, a in trainer.lora.items()},
        "scale": {_key(p): _take(p, v.get_value(), slot) for p, v in _scales(trainer).items()},
    }
    if with_optimizer:
        state["m"] = {_key(p): _take(p, a, slot) for p, a in trainer.opt_state["m"].items()}
        state["v"] = {_key(p): _take(p, a, slot) for p, a in trainer.opt_state["v"].items()}
        state["step"] = np.asarray(trainer.opt_state["step"][slot])
    return state


def set_slot_state(trainer: Trainer, slot: int, state: dict, with_optimizer: bool = True) -> None:
    """Load a saved slot into `slot`; without the optimizer, its moments and step start from zero. Shapes are
    checked against the trainer's before anything changes. A state saved without optimizer (sampler weights)
    loads only without it."""
    if with_optimizer and "m" not in state:
        raise ValueError("this checkpoint holds adapter weights only (sampler weights), no optimizer state")
    for group, arrays in (("lora", trainer.lora),) + ((("m", trainer.opt_state["m"]),) if with_optimizer else ()):
        for path, array in arrays.items():
            saved = state[group].get(_key(path))
            expected = _take(path, array, slot).shape
            if saved is None or tuple(np.shape(saved)) != expected:
                found = None if saved is None else list(np.shape(saved))
                raise ValueError(f"checkpoint does not fit this model: {group} {_key(path)!r} expected shape "
                                 f"{list(expected)}, found {found}")
    trainer.lora = {p: _put(p, a, slot, state["lora"][_key(p)]) for p, a in trainer.lora.items()}
    for path, var in _scales(trainer).items():
        var.set_value(_put(path, var.get_value(), slot, state["scale"][_key(path)]))
    zero = lambda p, a: np.zeros(_take(p, a, slot).shape, np.float32)  # noqa: E731
    opt = trainer.opt_state
    trainer.opt_state = {
        "m": {p: _put(p, a, slot, state["m"][_key(p)] if with_optimizer else zero(p, a)) for p, a in opt["m"].items()},
        "v": {p: _put(p, a, slot, state["v"][_key(p)] if with_optimizer else zero(p, a)) for p, a in opt["v"].items()},
        "step": opt["step"].at[slot].set(int(state["step"]) if with_optimizer else 0),
    }
    trainer.grads = {p: jnp.where(slot_mask(p, g, slot), 0.0, g) for p, g in trainer.grads.items()}


def save_state(trainer: Trainer, slot: int, path: str | os.PathLike, with_optimizer: bool = True) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), slot_state(trainer, slot, with_optimizer), force=True)
    checkpointer.wait_until_finished()


def load_state(trainer: Trainer, slot: int, path: str | os.PathLike, with_optimizer: bool = True) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no training state at {path}")
    state = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    set_slot_state(trainer, slot, jax.tree.map(np.asarray, state), with_optimizer)
