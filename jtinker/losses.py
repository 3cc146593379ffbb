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
inputs on the host before anything runs, so a bad request changes nothing. Every real-valued input and config
value must be finite and within MAX_MAGNITUDE: a finite 1e38 weight still overflows the fp32 loss to inf, and
many tenants' rows share one step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.checks import check_token_ids

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
MAX_MAGNITUDE = 1e6  # |weights|, |advantages|, |logprobs|, clip thresholds and loss_fn_config values


class NonFiniteError(ValueError):
    """A request's loss or gradient came out NaN or infinite; nothing was added to its adapter's gradients."""


def nonfinite_message(slots, backward: bool) -> str:
    """One line; `slots` empty means "this request" (a server's client has no use for slot numbers)."""
    what = "loss or gradient" if backward else "loss or log-probs"
    where = f"adapter slot(s) {', '.join(map(str, slots))}" if slots else "this request"
    return (f"non-finite {what} for {where} (inputs too large for fp32, or "
            f"the adapter's weights are no longer finite); nothing was added to the adapter's gradients")


class LossInputError(ValueError):
    """A request whose loss inputs cannot be used: one line naming the datum and field."""


def validate(loss_fn: str, loss_fn_inputs: dict, num_tokens: int, vocab_size: int, config: dict | None = None,
             where: str = "datum") -> None:
    """Check one datum's inputs: known loss, required fields, shapes [N] (or [N, K] for cross-entropy targets and
    weights), target ids inside the vocabulary, real values finite and within MAX_MAGNITUDE, clip thresholds
    0 <= low <= high."""
    if loss_fn not in REQUIRED:
        raise LossInputError(f"unknown loss_fn {loss_fn!r}; expected one of {', '.join(LOSS_NAMES)}")
    if loss_fn == "dro" and (config or {}).get("beta") is None:
        raise LossInputError("loss_fn 'dro' needs loss_fn_config={'beta': ...}")
    validate_config(config)
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
        if name == "target_tokens":
            continue
        if array.dtype.kind not in "biuf":
            raise LossInputError(f"{where}: loss_fn_inputs[{name!r}] must hold numbers, got dtype {array.dtype}")
        outside = ~(np.abs(array.astype(np.float64)) <= MAX_MAGNITUDE)  # NaN compares False: caught here too
        if outside.any():
            bad = tuple(np.argwhere(outside)[0])
            raise LossInputError(f"{where}: loss_fn_inputs[{name!r}] is {array[bad]} at token {bad[0]}; it must be "
                                 f"finite with magnitude <= {MAX_MAGNITUDE:g}")
    for name in ("clip_low_threshold", "clip_high_threshold"):
        if name in loss_fn_inputs and np.any(np.asarray(loss_fn_inputs[name]) < 0):
            raise LossInputError(f"{where}: loss_fn_inputs[{name!r}] must be >= 0")
    if "clip_low_threshold" in loss_fn_inputs or "clip_high_threshold" in loss_fn_inputs:
        low, high = _clip_bounds(loss_fn_inputs, config)
        if np.any(np.asarray(low) > np.asarray(high)):
            raise LossInputError(f"{where}: clip_low_threshold must be <= clip_high_threshold at every token")
    check_token_ids(loss_fn_inputs["target_tokens"], vocab_size, where, what="target token", error=LossInputError)


def validate_config(config: dict | None) -> None:
    """loss_fn_config values are finite numbers within MAX_MAGNITUDE (e.g. dro's `beta`); clip thresholds are
    >= 0 with low <= high. A NaN `beta` or threshold would otherwise train the caller's adapter on NaN."""
    config = config or {}
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise LossInputError(f"loss_fn_config[{key!r}] must be a number, got {value!r}"[:200])
        if not abs(value) <= MAX_MAGNITUDE:
            raise LossInputError(f"loss_fn_config[{key!r}] is {value}; it must be finite with magnitude <= "
                                 f"{MAX_MAGNITUDE:g}")
    low, high = _clip_bounds({}, config)
    if low < 0 or high < 0 or low > high:
        raise LossInputError(f"loss_fn_config clip thresholds must satisfy 0 <= clip_low_threshold <= "
                             f"clip_high_threshold, got {low} and {high}")


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
