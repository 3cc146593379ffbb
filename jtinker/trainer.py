"""The training engine: many LoRA adapters on one frozen base model.

`forward_backward` runs a padded batch whose rows may belong to different adapter slots in one compiled
program and adds each row's gradient into its slot's slice of a gradient accumulator; `optim_step` applies
AdamW to one slot and clears its accumulator. Shapes are bucketed (powers of two) so a handful of programs
serve every request size; compiles are counted.

Rows of many tenants share one step, so a non-finite value must stay in its own slot: the step checks each
slot's rows (loss terms, log-probs) and gradients for finiteness, adds nothing for a slot that fails, and
reports it (`nonfinite_slots`) so that only that slot's request fails.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtinker import losses
from jtinker.optim import AdamParams, adamw_step, check_adam_params, hyperparameters, init_state, slot_mask
from models.checks import check_token_ids, pow2_bucket
from models.lora import LoRAParam, slot_axes
from parallel.mesh import make_mesh
from parallel.sharding import Layout, mesh_axes_of, variable_shardings


MIN_TOKENS_BUCKET = 16  # shortest padded sequence: fewer programs for short requests


@dataclasses.dataclass
class Datum:
    """One training sequence: input tokens and per-token loss inputs (`target_tokens`, `weights`, ...)."""

    tokens: np.ndarray
    loss_fn_inputs: dict


@dataclasses.dataclass
class ForwardBackwardResult:
    loss: float
    logprobs: list[np.ndarray]  # per datum, the shape of its target_tokens
    elementwise_loss: list[np.ndarray]
    metrics: dict
    nonfinite_slots: tuple[int, ...] = ()  # slots whose loss or gradient was not finite: nothing was added for them


class Trainer:
    """Every step runs on a mesh (`mesh`, default one device: a mesh of one, which is the single-device
    program): base weights, LoRA factors, gradients and AdamW moments placed by their logical axes through the
    sharding rules, batches split over the batch axes, the step compiled with those in/out shardings and traced
    under `jax.set_mesh` (activation constraints and expert-parallel MoE when the mesh has several devices)."""

    def __init__(self, model: nnx.Module, mesh: Mesh | None = None):
        self.layout = Layout(mesh if mesh is not None else make_mesh(None, jax.devices()[:1]))
        self.graphdef, lora, base = nnx.split(model, LoRAParam, ...)
        self._lora_template = lora
        self.vocab_size = model.config.vocab_size
        self.compiled_shapes: set[tuple] = set()
        self.slot_axes = slot_axes(model)
        self.num_slots = max(var.get_value().shape[self.slot_axes[p]] for p, var in nnx.to_flat_state(lora))
        mesh, rules = self.layout.mesh, self.layout.rules
        self._base_shardings = variable_shardings(base, mesh, rules)
        self._lora_shardings = dict(nnx.to_flat_state(variable_shardings(lora, mesh, rules)))
        self.base = jax.device_put(base, self._base_shardings)
        self.lora = self._place({path: var.get_value() for path, var in nnx.to_flat_state(lora)})
        self.grads = self._place({path: jnp.zeros(a.shape, jnp.float32) for path, a in self.lora.items()})
        state = init_state(self.lora, self.slot_axes)
        self.opt_state = {"m": self._place(state["m"]), "v": self._place(state["v"]), "step": state["step"]}
        batch_axes = mesh_axes_of("batch", rules, mesh)
        self.batch_multiple = int(np.prod([mesh.shape[a] for a in batch_axes]))
        batch = NamedSharding(mesh, PartitionSpec(batch_axes or None))
        replicated = NamedSharding(mesh, PartitionSpec())
        ins = (self._lora_shardings, self._base_shardings, batch, batch, batch, batch, batch)

        def positional(*args):  # jit takes no keyword arguments once in_shardings are given
            return self._loss_and_grads(*args[:7], loss_fn=args[7], config_items=args[8], backward=args[9])

        steps = {backward: jax.jit(positional, static_argnums=(7, 8, 9), in_shardings=ins,
                                   out_shardings=(replicated, (batch, batch),
                                                  self._lora_shardings if backward else replicated, replicated))
                 for backward in (False, True)}

        def step(*args, loss_fn, config_items, backward):
            with jax.set_mesh(mesh):  # the model reads the mesh from JAX's context while the step is traced
                return steps[backward](*args, loss_fn, config_items, backward)

        self._step = step

    def _place(self, arrays: dict) -> dict:
        """LoRA-shaped arrays (factors, gradients, moments) on their shardings."""
        return {p: jax.device_put(a, self._lora_shardings[p]) for p, a in arrays.items()}

    # ---------------------------------------------------------------------------------------------- pure parts

    def _merge(self, lora: dict, base=None):
        state = nnx.from_flat_state({p: v.replace(lora[p]) for p, v in nnx.to_flat_state(self._lora_template)})
        return nnx.merge(self.graphdef, state, self.base if base is None else base)

    def _loss_and_grads(self, lora, base, tokens, mask, slots, targets, inputs, *, loss_fn, config_items, backward):
        config = dict(config_items)

        def loss(lora):
            model = self._merge(lora, base)
            h, _ = model.hidden_states(tokens, attention_mask_BT=mask, adapter_ids_B=slots)
            lp = model.target_logprobs(h, targets[..., None] if targets.ndim == 2 else targets, slots)
            lp = lp[..., 0] if targets.ndim == 2 else lp
            terms = losses.elementwise_loss(loss_fn, lp, inputs, config)
            terms = terms * (mask[..., None] if terms.ndim == 3 else mask)
            return jnp.sum(terms), (lp, terms)

        if not backward:
            value, aux = loss(lora)
            return value, aux, jnp.zeros(()), self._finite_slots(slots, aux)
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        finite_S = self._finite_slots(slots, aux, grads)
        kept = {}
        for path, g in grads.items():
            shape = [1] * g.ndim
            axis = self.slot_axes[path]
            shape[axis] = g.shape[axis]
            kept[path] = jnp.where(finite_S[:g.shape[axis]].reshape(shape), g, 0.0)
        return value, aux, kept, finite_S

    def _finite_slots(self, slots_B, aux, grads=None):
        """[S] bool: every row of the slot has finite log-probs and loss terms and, with `grads`, the slot's slice
        of every gradient is finite. Padding rows (slot 0, zero inputs) are finite."""
        lp, terms = aux
        B = slots_B.shape[0]
        rows_ok_B = (jnp.all(jnp.isfinite(lp.reshape(B, -1)), axis=1)
                     & jnp.all(jnp.isfinite(terms.reshape(B, -1)), axis=1))
        finite_S = jnp.ones((self.num_slots,), bool).at[slots_B].min(rows_ok_B)
        for path, g in (grads or {}).items():
            axis = self.slot_axes[path]
            ok = jnp.all(jnp.isfinite(g), axis=tuple(a for a in range(g.ndim) if a != axis))
            finite_S = finite_S.at[:ok.shape[0]].min(ok)
        return finite_S

    # ------------------------------------------------------------------------------------------------- the API

    def forward_backward(self, data: list[Datum], slots: list[int], loss_fn: str, loss_fn_config: dict | None = None,
                         backward: bool = True) -> ForwardBackwardResult:
        """Loss, per-datum log-probs and per-token losses; with `backward`, gradients are added to each datum's
        slot. Everything is validated first: a bad datum raises and changes nothing. A slot whose loss or
        gradient is not finite gets nothing added, and then NonFiniteError names it (the other slots' gradients
        were added)."""
        self.validate(data, slots, loss_fn, loss_fn_config)
        result = self.run_validated(data, slots, loss_fn, loss_fn_config, backward)
        if result.nonfinite_slots:
            raise losses.NonFiniteError(losses.nonfinite_message(result.nonfinite_slots, backward))
        return result

    def batch_key(self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None, backward: bool) -> tuple:
        """Requests with equal keys can run as one batch (same program: loss, config, target shape, inputs)."""
        first = data[0].loss_fn_inputs
        return (loss_fn, tuple(sorted((loss_fn_config or {}).items())), backward,
                np.shape(first["target_tokens"])[1:], tuple(sorted(first)))

    def validate(self, data: list[Datum], slots: list[int], loss_fn: str, loss_fn_config: dict | None = None):
        """Raise LossInputError for anything `forward_backward` cannot run; change nothing."""
        if not data:
            raise losses.LossInputError("forward_backward needs at least one datum")
        if len(slots) != len(data):
            raise losses.LossInputError(f"{len(data)} data but {len(slots)} adapter slots")
        outside = [s for s in slots if not 0 <= s < self.num_slots]  # -1 would index (and train) the last slot
        if outside:
            raise losses.LossInputError(f"adapter slot {outside[0]} is outside [0, {self.num_slots})")
        for i, datum in enumerate(data):
            tokens = np.asarray(datum.tokens)
            if tokens.ndim != 1 or not len(tokens):
                raise losses.LossInputError(f"datum {i}: model_input must be a non-empty token sequence")
            check_token_ids(tokens, self.vocab_size, f"datum {i}", error=losses.LossInputError)
            losses.validate(loss_fn, datum.loss_fn_inputs, len(tokens), self.vocab_size, loss_fn_config,
                            where=f"datum {i}")
        keys = {self.batch_key([d], loss_fn, loss_fn_config, True) for d in data}
        if len(keys) > 1:
            raise losses.LossInputError("all data of one request need the same loss_fn_inputs names and target shape")

    def run_validated(self, data, slots, loss_fn, loss_fn_config, backward) -> ForwardBackwardResult:
        """`forward_backward` without the checks, for callers that validated each request already."""
        B, T = pow2_bucket(len(data)), pow2_bucket(max(len(d.tokens) for d in data), MIN_TOKENS_BUCKET)
        B = -(-B // self.batch_multiple) * self.batch_multiple  # a whole number of rows per batch shard
        k_shape = np.shape(data[0].loss_fn_inputs["target_tokens"])[1:]
        tokens = np.zeros((B, T), np.int32)
        mask = np.zeros((B, T), np.float32)
        targets = np.zeros((B, T) + k_shape, np.int32)
        names = [n for n in data[0].loss_fn_inputs if n != "target_tokens"]
        inputs = {n: np.zeros((B, T) + (k_shape if n == "weights" else ()), np.float32) for n in names}
        for b, d in enumerate(data):
            n = len(d.tokens)
            tokens[b, :n], mask[b, :n] = d.tokens, 1
            targets[b, :n] = d.loss_fn_inputs["target_tokens"]
            for name in names:
                inputs[name][b, :n] = d.loss_fn_inputs[name]
        slot_array = np.zeros((B,), np.int32)
        slot_array[:len(data)] = slots
        config_items = tuple(sorted((loss_fn_config or {}).items()))
        self.compiled_shapes.add((B, T, k_shape, loss_fn, config_items, backward))
        value, (lp, terms), grads, finite_S = self._step(self.lora, self.base, jnp.asarray(tokens), jnp.asarray(mask),
                                               jnp.asarray(slot_array), jnp.asarray(targets),
                                               {n: jnp.asarray(a) for n, a in inputs.items()}, loss_fn=loss_fn,
                                               config_items=config_items, backward=backward)
        if backward:
            self.grads = {p: self.grads[p] + grads[p] for p in self.grads}
        lp, terms, finite_S = np.asarray(lp), np.asarray(terms), np.asarray(finite_S)
        lengths = [len(d.tokens) for d in data]
        return ForwardBackwardResult(
            loss=float(value), logprobs=[lp[b, :n] for b, n in enumerate(lengths)],
            elementwise_loss=[terms[b, :n] for b, n in enumerate(lengths)], metrics={"loss:sum": float(value)},
            nonfinite_slots=tuple(sorted(s for s in set(slots) if not finite_S[s])))

    def optim_step(self, slot: int, params: AdamParams = AdamParams()) -> dict:
        """AdamW on `slot` with its accumulated gradients, which are then cleared. Bad hyperparameters raise
        ValueError before anything changes."""
        check_adam_params(params)
        self.lora, self.opt_state, metrics = adamw_step(self.lora, self.grads, self.opt_state, slot,
                                                        hyperparameters(params), slot_axes=self.slot_axes)
        self.clear_grads(slot)
        return {k: float(v) for k, v in metrics.items()}

    def clear_grads(self, slot: int) -> None:
        """Drop `slot`'s accumulated gradients (after its step, or when its adapter is replaced)."""
        self.grads = {p: jnp.where(slot_mask(self.slot_axes[p], g, slot), 0.0, g) for p, g in self.grads.items()}

    def reset_from(self, model: nnx.Module, slot: int) -> None:
        """Take `slot`'s adapter (factors and scales) from `model` (e.g. after `init_adapter_slot`), with fresh
        optimizer state and no pending gradients for that slot."""
        _, lora, base = nnx.split(model, LoRAParam, ...)
        self.base = jax.device_put(base, self._base_shardings)
        fresh = self._place({path: var.get_value() for path, var in nnx.to_flat_state(lora)})
        in_slot = lambda p, a: slot_mask(self.slot_axes[p], a, slot)  # noqa: E731
        self.lora = {p: jnp.where(in_slot(p, a), fresh[p], a) for p, a in self.lora.items()}
        zero = lambda p, a: jnp.where(in_slot(p, a), 0.0, a)  # noqa: E731
        self.opt_state = {"m": {p: zero(p, a) for p, a in self.opt_state["m"].items()},
                          "v": {p: zero(p, a) for p, a in self.opt_state["v"].items()},
                          "step": self.opt_state["step"].at[slot].set(0)}
        self.grads = {p: zero(p, g) for p, g in self.grads.items()}

    def model(self) -> nnx.Module:
        """The model with the current adapter weights (for sampling or export)."""
        return self._merge(self.lora)
