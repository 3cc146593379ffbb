"""`jtinker plan`: will a LoRA RL step (and decoding) of a full-size model fit N devices of a given memory?

The model is built abstractly (shapes only, `create_abstract_model`), placed on a virtual mesh of N CPU devices
by the sharding rules, and the real steps are compiled ahead of time: the training step is the trainer's
forward + backward with the PPO loss (gradients for the LoRA factors only), the decode step one token for a
batch of sequences against a KV cache of `seq_len`. Per-device memory comes from the compiled programs;
AdamW moments and the gradient accumulator, which live between steps, are added from their shardings.
Searches (smallest N, largest micro-batch) compile again per candidate, so everything is the compiler's word.

Mesh for N devices (unless `--mesh` is given): `expert` = the largest power of two dividing N and the expert
count, `fsdp` = the rest, so routed experts are split over `expert` and everything else is fully sharded
(the `embed` rule maps to fsdp and expert) and every device holds its own sequences.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jtinker import losses
from models.config import with_quantization_config
from models.lora import LoraConfig, LoRAParam
from parallel import Layout, format_mesh, make_mesh, mesh_shape, variable_shardings
from parallel.expert import ExpertParallel
from parallel.planner import GB, compile_memory, shard_bytes
from parallel.sharding import mesh_axes_of

MAX_PLAN_DEVICES = 512
DEVICE_CANDIDATES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def default_mesh(num_devices: int, num_experts: int) -> dict:
    common = math.gcd(num_devices, num_experts or 1)
    ep = common & -common  # the largest power of two dividing both
    return mesh_shape({"expert": ep, "fsdp": -1}, num_devices)


def _text_model(model):
    return getattr(model, "language_model", model)


def _abstract(tree, shardings, dtype=None):
    """ShapeDtypeStructs (of `dtype`, default their own) carrying their shardings, for `shard_bytes`."""
    def one(sharding, leaf):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        return jax.ShapeDtypeStruct(value.shape, dtype or value.dtype, sharding=sharding)
    return jax.tree.map(one, shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


class Planner:
    """One preset, LoRA rank and dtype; compiles steps for any device count, mesh and batch."""

    def __init__(self, preset: str, *, lora_rank: int = 32, seq_len: int = 4096, dtype: str = "bfloat16",
                 mesh_spec: str | None = None, decode_batch: int | None = None, capacity_factor: float = 2.0,
                 quant: str = "auto"):
        from models.registry import create_abstract_model, preset_config

        self.preset, self.seq_len, self.mesh_spec = preset, seq_len, mesh_spec
        self.cfg = with_quant(preset_config(preset), quant)
        self.text_cfg = getattr(self.cfg, "text", self.cfg)
        self.lora = LoraConfig(num_slots=2, max_rank=lora_rank)
        self.decode_batch = decode_batch
        model = create_abstract_model(self.cfg, lora=self.lora, dtype=dtype,
                                      expert_parallel=ExpertParallel(capacity_factor=capacity_factor))
        self.graphdef, lora, base = nnx.split(model, LoRAParam, ...)
        self.lora_state = jax.tree.map(lambda v: v, lora)
        self.base_state = base
        self.num_experts = getattr(self.text_cfg, "num_experts", None) or getattr(self.text_cfg, "n_routed_experts", 1)
        self.cache_spec = _text_model(model).cache_spec()
        self.dtype = jnp.dtype(dtype)
        self.results: list[dict] = []

    # ------------------------------------------------------------------------------------------------ layouts

    def layout(self, num_devices: int) -> Layout:
        shape = (mesh_shape(self.mesh_spec, num_devices) if self.mesh_spec
                 else default_mesh(num_devices, self.num_experts))
        devices = jax.devices()[:num_devices]
        if len(devices) < num_devices:
            raise ValueError(f"plan for {num_devices} devices needs as many virtual devices; this process has "
                             f"{len(devices)} (run through `jtinker plan`, which sets them up)")
        return Layout(make_mesh(shape, devices))

    def _state_shardings(self, layout):
        return (variable_shardings(self.lora_state, layout.mesh, layout.rules),
                variable_shardings(self.base_state, layout.mesh, layout.rules))

    def batch_shards(self, layout) -> int:
        return math.prod(layout.mesh.shape[a] for a in mesh_axes_of("batch", layout.rules, layout.mesh))

    # ----------------------------------------------------------------------------------------------- training

    def train_memory(self, num_devices: int, micro_batch: int = 1) -> dict:
        """Per-device bytes of the LoRA RL step with `micro_batch` sequences per batch shard."""
        layout = self.layout(num_devices)
        mesh = layout.mesh
        lora_sh, base_sh = self._state_shardings(layout)
        B, T = micro_batch * self.batch_shards(layout), self.seq_len
        batch = NamedSharding(mesh, layout.spec((B, T), ("batch", None)))
        graphdef = self.graphdef

        def step(lora, base, tokens, mask, slots, targets, logprobs, advantages):
            def loss(lora):
                model = nnx.merge(graphdef, lora, base)
                h, _ = model.hidden_states(tokens, attention_mask_BT=mask, adapter_ids_B=slots)
                lp = model.target_logprobs(h, targets[..., None], slots)[..., 0]
                terms = losses.elementwise_loss("ppo", lp, {"logprobs": logprobs, "advantages": advantages})
                return jnp.sum(terms * mask)
            return jax.value_and_grad(loss)(lora)

        tok = jax.ShapeDtypeStruct((B, T), jnp.int32)
        f32 = jax.ShapeDtypeStruct((B, T), jnp.float32)
        args = (self.lora_state, self.base_state, tok, f32, jax.ShapeDtypeStruct((B,), jnp.int32), tok, f32, f32)
        slot_sh = NamedSharding(mesh, layout.spec((B,), ("batch",)))
        replicated = NamedSharding(mesh, PartitionSpec())
        with jax.set_mesh(mesh):  # the model reads the mesh from JAX's context while it is traced
            compiled = compile_memory(step, args, in_shardings=(lora_sh, base_sh, batch, batch, slot_sh, batch,
                                                                batch, batch), out_shardings=(replicated, lora_sh))
        weights = shard_bytes(_abstract(self.base_state, base_sh))
        lora = shard_bytes(_abstract(self.lora_state, lora_sh))
        fp32_lora = shard_bytes(_abstract(self.lora_state, lora_sh, jnp.float32))
        batch_bytes = shard_bytes([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a, sh in
                                   zip(args[2:], (batch, batch, slot_sh, batch, batch, batch))])
        parts = {"weights": weights, "lora": lora, "optimizer": 2 * fp32_lora,  # AdamW m and v, resident
                 "gradients": fp32_lora + compiled.outputs,  # accumulator (resident) + this step's gradients
                 "activations_and_temporaries": compiled.temporaries, "batch": batch_bytes}
        return self._record("train", layout, parts, compiled, micro_batch=micro_batch, batch=B)

    # ------------------------------------------------------------------------------------------------- decode

    def decode_memory(self, num_devices: int, batch: int | None = None) -> dict:
        """Per-device bytes of one decode step for `batch` sequences with a `seq_len` cache."""
        layout = self.layout(num_devices)
        mesh = layout.mesh
        lora_sh, base_sh = self._state_shardings(layout)
        B, S = batch or self.decode_batch or 4 * self.batch_shards(layout), self.seq_len
        cache, cache_sh = [], []
        for layers, shapes in self.cache_spec:
            entries = tuple(jax.ShapeDtypeStruct((layers, B, S) + shape, self.dtype) for shape in shapes)
            names = tuple(("layers", "batch", None) + (("kv_heads", None) if len(shape) == 2 else (None,))
                          for shape in shapes)
            cache.append(entries)
            cache_sh.append(tuple(NamedSharding(mesh, layout.spec(e.shape, n)) for e, n in zip(entries, names)))
        graphdef = self.graphdef

        def step(lora, base, cache, ids, positions, mask, slots):
            lm = _text_model(nnx.merge(graphdef, lora, base))
            h, new = lm.forward_cached(ids, positions_BT=positions, mask_BTS=mask, adapter_ids_B=slots,
                                       cache=cache)
            return jnp.argmax(lm.logits(h, slots), axis=-1), new

        row = NamedSharding(mesh, layout.spec((B, 1), ("batch", None)))
        args = (self.lora_state, self.base_state, cache, jax.ShapeDtypeStruct((B, 1), jnp.int32),
                jax.ShapeDtypeStruct((B, 1), jnp.int32), jax.ShapeDtypeStruct((B, 1, S + 1), jnp.bool_),
                jax.ShapeDtypeStruct((B,), jnp.int32))
        slot_sh = NamedSharding(mesh, layout.spec((B,), ("batch",)))
        mask_sh = NamedSharding(mesh, layout.spec((B, 1, S + 1), ("batch", None, None)))
        with jax.set_mesh(mesh):  # the model reads the mesh from JAX's context while it is traced
            compiled = compile_memory(step, args, in_shardings=(lora_sh, base_sh, cache_sh, row, row, mask_sh,
                                                                slot_sh))
        weights = shard_bytes(_abstract(self.base_state, base_sh))
        lora = shard_bytes(_abstract(self.lora_state, lora_sh))
        kv = shard_bytes(_abstract(cache, cache_sh))
        batch_bytes = shard_bytes([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a, sh in
                                   zip(args[3:], (row, row, mask_sh, slot_sh))])
        parts = {"weights": weights, "lora": lora, "kv_cache": kv,
                 "activations_and_temporaries": compiled.temporaries,
                 "outputs_and_batch": compiled.outputs + batch_bytes}
        return self._record("decode", layout, parts, compiled, batch=B)

    def _record(self, step: str, layout: Layout, parts: dict, compiled, **extra) -> dict:
        result = {"step": step, "devices": layout.mesh.size, "mesh": format_mesh(dict(layout.mesh.shape)),
                  "per_device_bytes": sum(parts.values()), "parts": parts,
                  "compile_seconds": compiled.compile_seconds, **extra}
        self.results.append(result)
        return result

    # ----------------------------------------------------------------------------------------------- searches

    def state_bytes(self, num_devices: int) -> int:
        """Per-device bytes of what the training step keeps between steps (weights, LoRA, AdamW moments,
        gradient accumulator): exact from the shardings, no compile."""
        lora_sh, base_sh = self._state_shardings(self.layout(num_devices))
        return (shard_bytes(_abstract(self.base_state, base_sh)) + shard_bytes(_abstract(self.lora_state, lora_sh))
                + 3 * shard_bytes(_abstract(self.lora_state, lora_sh, jnp.float32)))

    def min_devices(self, device_memory: int, reference: dict) -> int | None:
        """Smallest device count (from DEVICE_CANDIDATES whose mesh divides the model) where one sequence per
        batch shard fits. The resident state per device is exact for every N; the rest (activations and
        temporaries, for a fixed per-device batch) is taken from the `reference` compile to pick a candidate,
        which is then compiled to confirm (moving up, or down, a candidate at a time)."""
        resident = reference["per_device_bytes"] - self.state_bytes(reference["devices"])
        candidates = [n for n in DEVICE_CANDIDATES if n <= len(jax.devices()) and self._usable(n)]
        guess = next((i for i, n in enumerate(candidates) if self.state_bytes(n) + resident <= device_memory), None)
        if guess is None:
            return None

        def fits(i):
            n = candidates[i]
            found = reference if n == reference["devices"] else self.train_memory(n)
            return found["per_device_bytes"] <= device_memory

        if fits(guess):
            while guess > 0 and fits(guess - 1):
                guess -= 1
            return candidates[guess]
        while guess + 1 < len(candidates):
            guess += 1
            if fits(guess):
                return candidates[guess]
        return None

    def _usable(self, n: int) -> bool:
        try:
            self.layout(n)
            return True
        except ValueError:
            return False

    def max_micro_batch(self, num_devices: int, device_memory: int, limit: int = 256) -> int:
        """Largest number of sequences per batch shard whose training step fits (0 if not even one): memory
        grows linearly in the batch, so two compiles predict it and one (rarely more) confirms it."""
        def measure(mb):
            return (self._find("train", num_devices, mb) or self.train_memory(num_devices, mb))["per_device_bytes"]

        one = measure(1)
        if one > device_memory:
            return 0
        slope = max(measure(2) - one, 1)
        guess = max(1, min(limit, 1 + int((device_memory - one) // slope)))
        while guess > 2 and measure(guess) > device_memory:
            guess = max(2, guess - max(1, guess // 8))
        return guess if measure(guess) <= device_memory else 1

    def _find(self, step, devices, micro_batch):
        for r in self.results:
            if r["step"] == step and r["devices"] == devices and r.get("micro_batch") == micro_batch:
                return r
        return None


QUANTIZATION_CONFIGS = {  # as Kimi K2 Thinking's and Kimi K2 Instruct's checkpoints declare them
    "int4": {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                 "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}},
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
}


def with_quant(cfg, quant: str):
    """The config whose model keeps its weights as `quant` says: "auto" as the preset's checkpoint stores them
    (routed experts 4-bit for Kimi K2 Thinking, FP8 for Kimi K2 Instruct and DeepSeek-V3), "bf16" everything
    bf16, "int4" / "fp8" routed experts in that format (every family: Qwen3 ships FP8 releases too). Other
    weights of a quantized checkpoint are dequantized to bf16 on load."""
    if quant == "auto":
        return cfg
    if quant not in ("bf16", "int4", "fp8"):
        raise ValueError(f"--quant {quant!r}: expected auto, bf16, fp8 or int4")
    return with_quantization_config(cfg, QUANTIZATION_CONFIGS.get(quant))


def run_plan(preset: str, *, devices: int, device_memory: int, mesh: str | None = None, batch: int = 1,
             seq_len: int = 4096, lora_rank: int = 32, quant: str = "auto", decode: bool = True,
             decode_batch: int | None = None, search: bool = True) -> dict:
    """Everything `jtinker plan` prints: the step at `devices`, whether it fits, the smallest device count, the
    largest micro-batch, and the decode step."""
    start = time.perf_counter()
    planner = Planner(preset, lora_rank=lora_rank, seq_len=seq_len, mesh_spec=mesh, decode_batch=decode_batch,
                      quant=quant)
    expert_quant = getattr(planner.cfg, "expert_quant", None)
    quant = f"routed experts {expert_quant.kind} ({expert_quant})" if expert_quant else "bf16"
    train = planner.train_memory(devices, batch)
    fits = train["per_device_bytes"] <= device_memory
    decode_result = planner.decode_memory(devices) if decode else None
    min_devices = planner.min_devices(device_memory, train if batch == 1 else planner.train_memory(devices)) \
        if search else None
    max_mb = planner.max_micro_batch(devices, device_memory) if search else None
    if decode_result is not None:
        fits = fits and decode_result["per_device_bytes"] <= device_memory
    return {"model": preset, "devices": devices, "device_memory_bytes": device_memory, "seq_len": seq_len,
            "lora_rank": lora_rank, "quant": quant, "mesh": train["mesh"], "micro_batch": batch,
            "fits": bool(fits), "per_device_bytes": train["per_device_bytes"], "parts": train["parts"],
            "decode": decode_result, "min_devices": min_devices, "max_micro_batch": max_mb,
            "compiles": planner.results, "seconds": round(time.perf_counter() - start, 1)}


def format_plan(result: dict) -> str:
    gb = lambda b: f"{b / GB:8.2f} GB"  # noqa: E731
    mem = result["device_memory_bytes"]
    lines = [f"jtinker plan: {result['model']} on {result['devices']} devices x {mem / GB:.3g} GB "
             f"(mesh {result['mesh']}), LoRA rank {result['lora_rank']}, seq {result['seq_len']}, "
             f"{result['micro_batch']} sequence(s) per batch shard, {result['quant']}"]
    header = f"  {'per device':<30}{'train (RL step)':>16}"
    decode = result["decode"]
    if decode:
        header += f"{'decode (B=' + str(decode['batch']) + ')':>20}"
    lines.append(header)
    keys = list(result["parts"]) + [k for k in (decode or {}).get("parts", {}) if k not in result["parts"]]
    for key in keys:
        row = f"  {key.replace('_', ' '):<30}{gb(result['parts'][key]) if key in result['parts'] else '':>16}"
        if decode:
            row += f"{gb(decode['parts'][key]) if key in decode['parts'] else '':>20}"
        lines.append(row)
    total = f"  {'total':<30}{gb(result['per_device_bytes']):>16}"
    if decode:
        total += f"{gb(decode['per_device_bytes']):>20}"
    lines.append(total)
    lines.append(f"  fits {mem / GB:.3g} GB: {'yes' if result['fits'] else 'no'}")
    if result["min_devices"] is not None or result["max_micro_batch"] is not None:
        lines.append(f"  smallest device count that fits (train, 1 sequence per shard): {result['min_devices']}")
        lines.append(f"  largest micro-batch at {result['devices']} devices: {result['max_micro_batch']} sequence(s) "
                     "per batch shard")
    lines.append(f"  {len(result['compiles'])} compiles in {result['seconds']} s "
                 f"({', '.join(str(c['compile_seconds']) for c in result['compiles'])} s each)")
    return "\n".join(lines)
