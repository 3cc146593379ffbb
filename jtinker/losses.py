"""Tinker's built-in losses, with exactly its semantics: per-token terms summed (not averaged).

Every loss is a function of the policy's target log-probs `lp` (one per token, or [N, K] for cross-entropy
with K targets) and the datum's `loss_fn_inputs`; it returns the per-token `elementwise_loss` (what Tinker sums
into the loss). `q` is the sampler's log-prob (`logprobs`), `A` the advantage, r = exp(lp - q):

- cross_entropy:       -lp * w                      (w: real `weights`, any sign; [N] or [N, K])
- importance_sampling: -r * A
- ppo:                 -min(r A, clip(r, low, high) A)    (low/high from config, default 0.8/1.2, or per token)
- cispo:               -sg(clip(r, low, high)) * lp * A
- dro:                 -(lp A - beta/2 (lp - q)^2)         (`beta` from config, required)
- gspo:                as ppo with r_t = sg(s) * exp(lp - sg(lp)), s = exp(mean over `sequence_ratio_mask` of
                       sg(lp) - q): every token carries the sequence ratio's value and its own gradient.

Inputs arrive padded to [B, T] (padding: zero weights/advantages, zero mask); `validate` checks a datum's
inputs on the host before anything runs, so a bad request changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REQUIRED = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask"),
}
OPTIONAL = {"ppo": ("clip_low_threshold", "clip_high_threshold"), "cispo": ("clip_low_threshold", "clip_high_threshold"),
            "gspo": ("clip_low_threshold", "clip_high_threshold")}
DEFAULT_CLIP = (0.8, 1.2)
LOSS_NAMES = tuple(REQUIRED)


class LossInputError(ValueError):
    """A request whose loss inputs cannot be used: one line naming the datum and field."""


def validate(loss_fn: str, loss_fn_inputs: dict, num_tokens: int, vocab_size: int, config: dict | None = None,
             where: str = "datum") -> None:
    """Check one datum's inputs: known loss, required fields, shapes [N] (or [N, K] for cross-entropy targets and
    weights), target ids inside the vocabulary, finite values."""
    if loss_fn not in REQUIRED:
        raise LossInputError(f"unknown loss_fn {loss_fn!r}; expected one of {', '.join(LOSS_NAMES)}")
    if loss_fn == "dro" and (config or {}).get("beta") is None:
        raise LossInputError("loss_fn 'dro' needs loss_fn_config={'beta': ...}")
    allowed = set(REQUIRED[loss_fn]) | set(OPTIONAL.get(loss_fn, ()))
    for name in REQUIRED[loss_fn]:
        if name not in loss_fn_inputs:
            raise LossInputError(f"{where}: loss_fn {loss_fn!r} needs loss_fn_inputs[{name!r}]")
    for name in loss_fn_inputs:
        if name not in allowed:
            raise LossInputError(f"{where}: loss_fn {loss_fn!r} does not take loss_fn_inputs[{name!r}]; it takes "
                                 f"{', '.join(sorted(allowed))}")
    target_shape = np.shape(loss_fn_inputs["target_tokens"])
    if target_shape[:1] != (num_tokens,) or len(target_shape) > (2 if loss_fn == "cross_entropy" else 1):
        raise LossInputError(f"{where}: loss_fn_inputs['target_tokens'] has shape {list(target_shape)}, expected "
                             f"[{num_tokens}]{' or [N, K]' if loss_fn == 'cross_entropy' else ''} (N = model_input "
                             "length)")
    for name, value in loss_fn_inputs.items():
        array = np.asarray(value)
        expected = target_shape if (name == "weights" and loss_fn == "cross_entropy") else (num_tokens,)
        if name != "target_tokens" and array.shape != tuple(expected):
            raise LossInputError(f"{where}: loss_fn_inputs[{name!r}] has shape {list(array.shape)}, expected "
                                 f"{list(expected)}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            bad = int(np.argwhere(~np.isfinite(array))[0][0])
            raise LossInputError(f"{where}: loss_fn_inputs[{name!r}] is not finite at token {bad} ({array.flat[bad]})")
    targets = np.asarray(loss_fn_inputs["target_tokens"])
    outside = (targets < 0) | (targets >= vocab_size)
    if outside.any():
        bad = int(targets.flat[int(np.argmax(outside.reshape(-1)))])
        raise LossInputError(f"{where}: target token {bad} is outside the vocabulary [0, {vocab_size})")


def _clip_bounds(inputs: dict, config: dict | None):
    config = config or {}
    low = inputs.get("clip_low_threshold", config.get("clip_low_threshold", DEFAULT_CLIP[0]))
    high = inputs.get("clip_high_threshold", config.get("clip_high_threshold", DEFAULT_CLIP[1]))
    return low, high


def elementwise_loss(loss_fn: str, lp, inputs: dict, config: dict | None = None):
    """Per-token loss terms (same shape as `lp`); the loss is their sum. All arrays [B, T] (or [B, T, K])."""
    if loss_fn == "cross_entropy":
        return -lp * inputs["weights"]
    q, advantages = inputs["logprobs"], inputs["advantages"]
    if loss_fn == "importance_sampling":
        return -jnp.exp(lp - q) * advantages
    if loss_fn == "dro":
        beta = config["beta"]
        return -(lp * advantages - 0.5 * beta * jnp.square(lp - q))
    low, high = _clip_bounds(inputs, config)
    if loss_fn == "cispo":
        ratio = jax.lax.stop_gradient(jnp.clip(jnp.exp(lp - q), low, high))
        return -ratio * lp * advantages
    if loss_fn == "ppo":
        ratio = jnp.exp(lp - q)
    elif loss_fn == "gspo":
        mask = (inputs["sequence_ratio_mask"] != 0).astype(lp.dtype)
        lp_value = jax.lax.stop_gradient(lp)
        count = jnp.sum(mask, axis=-1, keepdims=True)
        sequence_log_ratio = jnp.sum((lp_value - q) * mask, axis=-1, keepdims=True) / jnp.maximum(count, 1)
        ratio = jnp.exp(sequence_log_ratio + lp - lp_value)
    else:
        raise LossInputError(f"unknown loss_fn {loss_fn!r}; expected one of {', '.join(LOSS_NAMES)}")
    return -jnp.minimum(ratio * advantages, jnp.clip(ratio, low, high) * advantages)
