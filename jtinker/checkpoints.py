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

from jtinker.trainer import Trainer
from models.lora import LoRAScale


def _key(path) -> str:
    return "/".join(map(str, path))


def _take(axis: int, array, slot):
    return np.asarray(jnp.take(array, slot, axis=axis))


def _put(axis: int, array, slot, value):
    return jax.lax.dynamic_update_index_in_dim(array, jnp.asarray(value, array.dtype), slot, axis)


def _scales(trainer: Trainer):
    return {path: var for path, var in nnx.to_flat_state(trainer.base) if isinstance(var, LoRAScale)}


def slot_state(trainer: Trainer, slot: int, with_optimizer: bool = True) -> dict:
    """The slot's adapter (factors and scales) and, with the optimizer, its AdamW moments and step."""
    take = lambda p, a: _take(trainer.slot_axes[p], a, slot)  # noqa: E731
    state = {
        "lora": {_key(p): take(p, a) for p, a in trainer.lora.items()},
        "scale": {_key(p): take(p, v.get_value()) for p, v in _scales(trainer).items()},
    }
    if with_optimizer:
        state["m"] = {_key(p): take(p, a) for p, a in trainer.opt_state["m"].items()}
        state["v"] = {_key(p): take(p, a) for p, a in trainer.opt_state["v"].items()}
        state["step"] = np.asarray(trainer.opt_state["step"][slot])
    return state


def _fit_rank(path, saved, expected: tuple):
    """`saved` with its LoRA rank axis fitted to the model's max rank (zero-padded, or cut where the cut part is
    all zeros), so adapters move between engines of different max ranks; None if it cannot fit."""
    saved = np.asarray(saved)
    if saved.shape == expected:
        return saved
    axis = saved.ndim - 1 if path[-1] == "lora_a" else saved.ndim - 2
    if saved.ndim != len(expected) or path[-1] not in ("lora_a", "lora_b") or any(
            s != e for i, (s, e) in enumerate(zip(saved.shape, expected)) if i != axis):
        return None
    rank, saved_rank = expected[axis], saved.shape[axis]
    if saved_rank > rank:
        if np.any(np.take(saved, np.arange(rank, saved_rank), axis=axis)):
            return None  # the adapter's rank exceeds this model's max rank
        return np.take(saved, np.arange(rank), axis=axis)
    pad = [(0, 0)] * saved.ndim
    pad[axis] = (0, rank - saved_rank)
    return np.pad(saved, pad)


def set_slot_state(trainer: Trainer, slot: int, state: dict, with_optimizer: bool = True) -> None:
    """Load a saved slot into `slot`; without the optimizer, its moments and step start from zero. Shapes are
    checked against the trainer's before anything changes (a different max rank is fine as long as the
    adapter's own rank fits). A state saved without optimizer (sampler weights) loads only without it."""
    if with_optimizer and "m" not in state:
        raise ValueError("this checkpoint holds adapter weights only (sampler weights), no optimizer state")
    axes = trainer.slot_axes
    fitted = {"lora": {}, "m": {}, "v": {}}
    groups = ("lora", "m", "v") if with_optimizer else ("lora",)
    for group in groups:
        arrays = trainer.lora if group == "lora" else trainer.opt_state[group]
        for path, array in arrays.items():
            saved = state[group].get(_key(path))
            expected = _take(axes[path], array, slot).shape
            value = None if saved is None else _fit_rank(path, saved, expected)
            if value is None:
                found = None if saved is None else list(np.shape(saved))
                raise ValueError(f"checkpoint does not fit this model: {group} {_key(path)!r} expected shape "
                                 f"{list(expected)}, found {found}")
            fitted[group][_key(path)] = value
    trainer.lora = {p: _put(axes[p], a, slot, fitted["lora"][_key(p)]) for p, a in trainer.lora.items()}
    for path, var in _scales(trainer).items():
        var.set_value(_put(axes[path], var.get_value(), slot, state["scale"][_key(path)]))
    zero = lambda p, a: np.zeros(_take(axes[p], a, slot).shape, np.float32)  # noqa: E731
    put = lambda group, p, a: _put(axes[p], a, slot, fitted[group][_key(p)] if with_optimizer else zero(p, a))  # noqa: E731
    opt = trainer.opt_state
    trainer.opt_state = {
        "m": {p: put("m", p, a) for p, a in opt["m"].items()},
        "v": {p: put("v", p, a) for p, a in opt["v"].items()},
        "step": opt["step"].at[slot].set(int(state["step"]) if with_optimizer else 0),
    }
    trainer.clear_grads(slot)


def save_state(trainer: Trainer, slot: int, path: str | os.PathLike, with_optimizer: bool = True) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), slot_state(trainer, slot, with_optimizer), force=True)
    checkpointer.wait_until_finished()


def load_state(trainer: Trainer, slot: int, path: str | os.PathLike, with_optimizer: bool = True) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError("no training state in this checkpoint (it was saved for sampling only)")
    state = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    set_slot_state(trainer, slot, jax.tree.map(np.asarray, state), with_optimizer)


# ------------------------------------------------------------------------------------- sharded, every slot

def trainer_arrays(trainer: Trainer) -> dict:
    """Every slot's LoRA factors, scales and AdamW state as jax arrays keyed by path strings, in whatever
    sharding the trainer holds them (what `save_sharded` writes)."""
    return {"lora": {_key(p): a for p, a in trainer.lora.items()},
            "scale": {_key(p): v.get_value() for p, v in _scales(trainer).items()},
            "m": {_key(p): a for p, a in trainer.opt_state["m"].items()},
            "v": {_key(p): a for p, a in trainer.opt_state["v"].items()},
            "step": trainer.opt_state["step"]}


def save_sharded(trainer: Trainer, path: str | os.PathLike) -> None:
    """The whole adapter state, written shard by shard by the devices (and on several hosts the processes)
    that hold it: nothing is gathered onto one host."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), trainer_arrays(trainer), force=True)
    checkpointer.wait_until_finished()


def restore_sharded(trainer: Trainer, path: str | os.PathLike) -> None:
    """Read a `save_sharded` checkpoint straight into this trainer's shardings (its mesh may differ from the
    one that saved it: each device reads only its own pieces). Pending gradients are cleared."""
    if not os.path.isdir(path):
        raise FileNotFoundError("no training state in this checkpoint (it was saved for sampling only)")
    current = trainer_arrays(trainer)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), current)
    state = ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
    by_key = lambda group, arrays: {p: state[group][_key(p)] for p in arrays}  # noqa: E731
    trainer.lora = by_key("lora", trainer.lora)
    for p, var in _scales(trainer).items():
        var.set_value(state["scale"][_key(p)])
    trainer.opt_state = {"m": by_key("m", trainer.opt_state["m"]), "v": by_key("v", trainer.opt_state["v"]),
                         "step": state["step"]}
    trainer.grads = trainer._place({p: jnp.zeros(g.shape, g.dtype) for p, g in trainer.grads.items()})
