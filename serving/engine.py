"""The sampling engine, shaped like JetStream's: `prefill` (prompts -> cache prefix and last-position logits),
`insert` (a prefix row into a decode slot, sampling the first token there), `generate` (several decode steps
for all slots in one compiled `lax.scan`), `free`.

Why this shape: prefill is compute-bound and batched by prompt-length bucket; decode is bandwidth-bound and
runs every slot together, so requests join and leave slots between `generate` calls while others keep
decoding (the scheduler drives that). Several decode steps per call let XLA hoist the loop-invariant weight
work out of the step loop, which is most of the speed on CPU.

Weights are jit arguments, never closed over: base weights and LoRA arrays (`update_lora`) can change between
calls without recompiling, while requests are in flight. Every slot carries its own adapter slot id (0 = base
model), sampling parameters, seed key and stop ids. Small per-slot state lives on the host (numpy) and travels
with each call; the KV cache stays on device and is donated. Shapes are bucketed (prompt lengths, prefill
rows, inserted rows, steps and attention window: powers of two) and every compile is counted in `compiles`.

Letters: B decode slots, Bp prefill rows, T prompt bucket, S cache positions, W attention window, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers.attention import attention_mask
from models.checks import check_token_ids, pow2_bucket
from models.lora import LoRAParam, slot_axes
from serving import kv_cache
from serving.sampling import sample


@dataclasses.dataclass
class Prefix:
    """The result of `prefill`: cache entries of every prompt position (device, per segment [L, Bp, T, ...]),
    the logits after each prompt's last token (device [Bp, V] fp32), and host-side lengths and next positions."""

    entries: list
    logits: jax.Array
    lengths: np.ndarray
    positions: np.ndarray  # rope position of the first generated token (= length for text)
    adapters: np.ndarray
    prompt_logprobs: np.ndarray | None  # [Bp, T]: log p(token t+1 | tokens <= t), temperature 1

    @property
    def rows(self) -> int:
        return len(self.lengths)


@dataclasses.dataclass
class Target:
    """Where a prefix row goes and how its tokens are chosen."""

    row: int
    slot: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    key: np.ndarray | None = None  # uint32 [2] (serving.sampling.request_key); None for greedy
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0


@dataclasses.dataclass
class Emitted:
    """Tokens of one `insert` ([N]) or `generate` call ([steps, B]); `emitted` marks the real ones."""

    tokens: np.ndarray
    logprobs: np.ndarray
    emitted: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    active: np.ndarray  # [B] after the call: slots that will emit more


_SLOT_FIELDS = {"tokens": np.int32, "lengths": np.int32, "positions": np.int32, "adapters": np.int32,
                "temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "steps": np.int32,
                "remaining": np.int32, "active": np.bool_, "want_top": np.int32}


class Engine:
    def __init__(self, model: nnx.Module, *, num_slots: int = 8, max_len: int = 1024, max_prefill_batch: int = 8,
                 num_top_logprobs: int = 8, max_stop_ids: int = 8, min_prompt_bucket: int = 16):
        if max_len < 16 or max_len & (max_len - 1):
            raise ValueError(f"max_len must be a power of two >= 16, got {max_len}")
        self.graphdef, lora, self.base = nnx.split(model, LoRAParam, ...)
        self._lora_template = lora
        self.lora = {path: var.get_value() for path, var in nnx.to_flat_state(lora)}
        lm = getattr(model, "language_model", model)
        self.config, self.config_full = lm.config, model.config
        self.takes_images = hasattr(model, "multimodal_embeddings")
        self.vocab_size = lm.config.vocab_size
        self.num_slots, self.max_len, self.max_prefill_batch = num_slots, max_len, max_prefill_batch
        self.num_top, self.max_stop_ids, self.min_prompt_bucket = num_top_logprobs, max_stop_ids, min_prompt_bucket
        axes = slot_axes(model)
        self.num_adapters = next((a.shape[axes[p]] for p, a in self.lora.items()), 1)
        self.cache = kv_cache.init_cache(lm, num_slots, max_len, lm.dtype)
        self.slot = {name: np.zeros((num_slots,), dtype) for name, dtype in _SLOT_FIELDS.items()}
        self.slot["top_p"][:] = 1.0
        self.slot["keys"] = np.zeros((num_slots, 2), np.uint32)
        self.slot["stop_ids"] = np.full((num_slots, max_stop_ids), -1, np.int32)
        self.compiles: collections.Counter = collections.Counter()
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("with_prompt_logprobs", "image_grid_thw"))
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0,))
        self._generate = jax.jit(self._generate_fn, static_argnames=("steps", "window"), donate_argnums=(2,))

    # ------------------------------------------------------------------------------------------------ weights

    @property
    def compile_count(self) -> int:
        return sum(self.compiles.values())

    def update_lora(self, lora: dict, base: nnx.State | None = None) -> None:
        """New adapter weights for the next call: the trainer's {path: array} LoRA factors and, when adapter
        scales changed (a new adapter's rank or alpha), its `base` state too. They must have the shapes and
        dtypes of the current ones, so nothing recompiles and requests in flight continue with them."""
        if lora.keys() != self.lora.keys():
            raise ValueError("update_lora: the LoRA tensors do not match the model's (different model or config)")
        for path, array in lora.items():
            old = self.lora[path]
            if tuple(array.shape) != tuple(old.shape) or array.dtype != old.dtype:
                raise ValueError(f"update_lora: {'/'.join(map(str, path))} is {array.dtype}{list(array.shape)}, "
                                 f"expected {old.dtype}{list(old.shape)}")
        if base is not None:
            same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, self.base, base)
            if not all(jax.tree.leaves(same)):
                raise ValueError("update_lora: the base state does not match the model's")
            self.base = base
        self.lora = dict(lora)

    def _model(self, lora, base, *, full: bool = False):
        """The model with these weights (inside a program); the language model unless `full`."""
        state = nnx.from_flat_state({p: v.replace(lora[p]) for p, v in nnx.to_flat_state(self._lora_template)})
        model = nnx.merge(self.graphdef, state, base)
        return model if full else getattr(model, "language_model", model)

    def _count(self, name: str) -> None:
        """Runs at trace time only, i.e. once per compile."""
        self.compiles[name] += 1

    # ------------------------------------------------------------------------------------------ pure programs

    def _prefill_fn(self, lora, base, ids_BT, lengths_B, adapters_B, positions, pixel_values, *,
                    with_prompt_logprobs, image_grid_thw):
        self._count("prefill")
        full = self._model(lora, base, full=True)
        model = getattr(full, "language_model", full)
        B, T = ids_BT.shape
        valid_BT = jnp.arange(T)[None] < lengths_B[:, None]
        embeds = deepstack = None
        if pixel_values is not None:  # Qwen3-VL: image features at the image pad tokens, M-RoPE positions
            embeds, deepstack = full.multimodal_embeddings(ids_BT, pixel_values, image_grid_thw)
        h, entries = model.forward_cached(ids_BT, positions_BT=positions, mask_BTS=attention_mask(valid_BT, T),
                                          adapter_ids_B=adapters_B, inputs_embeds=embeds, deepstack=deepstack)
        h_last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)
        logits = model.logits(h_last, adapters_B)[:, 0].astype(jnp.float32)
        prompt_lp = None
        if with_prompt_logprobs:
            targets = jnp.concatenate([ids_BT[:, 1:], jnp.zeros((B, 1), ids_BT.dtype)], axis=1)
            prompt_lp = model.target_logprobs(h, targets[..., None], adapters_B)[..., 0]
        return entries, logits, prompt_lp

    def _insert_fn(self, cache, entries, logits_BV, rows_N, slots_N, temperature_N, top_k_N, top_p_N, keys_N2,
                   want_top_N):
        self._count("insert")
        cache = kv_cache.insert_prefixes(cache, entries, rows_N, slots_N)
        out = sample(logits_BV[rows_N], temperature_N, top_k_N, top_p_N, keys_N2, jnp.zeros_like(rows_N),
                     want_top_N, self.num_top)
        return (cache,) + out

    def _generate_fn(self, lora, base, cache, s, *, steps: int, window: int):
        self._count("generate")
        model = self._model(lora, base)
        B = s["tokens"].shape[0]
        adapters = s["adapters"]

        def step(carry, _):
            win, token, length, position, counter, remaining, active = carry
            valid_BS = jnp.arange(window)[None] < length[:, None]
            mask = jnp.concatenate([valid_BS, jnp.ones((B, 1), bool)], axis=1)[:, None, :]
            h, new = model.forward_cached(token[:, None], positions_BT=position[:, None], mask_BTS=mask,
                                          adapter_ids_B=adapters, cache=win)
            logits = model.logits(h, adapters)[:, 0]
            chosen, logprob, top_ids, top_lp = sample(logits, s["temperature"], s["top_k"], s["top_p"], s["keys"],
                                                      counter, s["want_top"], self.num_top)
            win = kv_cache.write_tokens(win, new, length)
            emitted = active
            remaining = remaining - emitted.astype(jnp.int32)
            stopped = jnp.any(chosen[:, None] == s["stop_ids"], axis=1)
            active = active & ~stopped & (remaining > 0)
            inc = emitted.astype(jnp.int32)
            carry = (win, jnp.where(emitted, chosen, token), length + inc, position + inc, counter + inc,
                     remaining, active)
            return carry, (chosen, logprob, emitted, top_ids, top_lp)

        init = (kv_cache.window(cache, window), s["tokens"], s["lengths"], s["positions"], s["steps"],
                s["remaining"], s["active"])
        (win, token, length, position, counter, remaining, active), out = jax.lax.scan(step, init, None, length=steps)
        cache = kv_cache.put_window(cache, win)
        state = {"tokens": token, "lengths": length, "positions": position, "steps": counter,
                 "remaining": remaining, "active": active}
        return cache, state, out

    # ---------------------------------------------------------------------------------------------- the API

    def prompt_bucket(self, length: int) -> int:
        return pow2_bucket(length, self.min_prompt_bucket, self.max_len)

    def prefill(self, prompts: list[list[int]], adapters: list[int] | None = None,
                prompt_logprobs: bool = False, images: tuple | None = None) -> Prefix:
        """Run prompts (at most `max_prefill_batch`, each shorter than `max_len`) through the model; rows are
        padded to a power of two and lengths to one power-of-two bucket. Qwen3-VL-MoE takes `images` =
        (pixel_values [P, C*T*p*p], grid_thw per image in order of appearance) for the image pad tokens of
        the prompts; decoding then continues after the largest M-RoPE position."""
        if not 1 <= len(prompts) <= self.max_prefill_batch:
            raise ValueError(f"prefill takes 1 to {self.max_prefill_batch} prompts, got {len(prompts)}")
        if images is not None and not self.takes_images:
            raise ValueError("this model takes no images")
        adapters = [0] * len(prompts) if adapters is None else list(adapters)
        for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
            if not 1 <= len(prompt) < self.max_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; this engine takes 1 to {self.max_len - 1}")
            check_token_ids(prompt, self.vocab_size, f"prompt {i}")
            if not 0 <= adapter < self.num_adapters:
                raise ValueError(f"adapter slot {adapter} is outside [0, {self.num_adapters})")
        rows = pow2_bucket(len(prompts), 1, self.max_prefill_batch)
        T = self.prompt_bucket(max(map(len, prompts)))
        ids = np.zeros((rows, T), np.int32)
        lengths = np.ones((rows,), np.int32)
        adapter_ids = np.zeros((rows,), np.int32)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)], lengths[i], adapter_ids[i] = prompt, len(prompt), adapters[i]
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T))
        next_positions = lengths.copy()
        pixel_values, grid = None, None
        if images is not None:
            from models.qwen3_vl_moe import mrope_positions

            pixel_values, grid = np.asarray(images[0], np.float32), tuple(tuple(int(v) for v in g) for g in images[1])
            mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
            positions = mrope_positions(ids, mask, grid, self.config_full).astype(np.int32)
            next_positions = np.asarray([positions[:, b, :n].max() + 1 for b, n in enumerate(lengths)], np.int32)
        entries, logits, prompt_lp = self._prefill(self.lora, self.base, ids, lengths, adapter_ids, positions,
                                                   pixel_values, with_prompt_logprobs=prompt_logprobs,
                                                   image_grid_thw=grid)
        n = len(prompts)
        return Prefix(entries, logits, lengths[:n].copy(), next_positions[:n].copy(), adapter_ids[:n].copy(),
                      None if prompt_lp is None else np.asarray(prompt_lp)[:n])

    def insert(self, prefix: Prefix, targets: list[Target]) -> Emitted:
        """Put prefix rows into decode slots (a row may go to several slots: samples of one prompt share its
        prefill) and sample each slot's first token (step 0 of its key). The slots then decode in `generate`
        until they stop, reach `max_tokens` or are freed. Returns the first tokens, [N] each."""
        if not targets:
            raise ValueError("insert needs at least one target")
        N = pow2_bucket(len(targets), 1, self.num_slots)
        if len(targets) > N:
            raise ValueError(f"insert takes at most {self.num_slots} targets")
        if len({t.slot for t in targets}) != len(targets):
            raise ValueError("insert: two targets for one slot")
        rows = np.zeros((N,), np.int32)
        slots = np.full((N,), self.num_slots, np.int32)  # one past the end: writes nothing
        temperature = np.zeros((N,), np.float32)
        top_k = np.full((N,), -1, np.int32)
        top_p = np.ones((N,), np.float32)
        keys = np.zeros((N, 2), np.uint32)
        want_top = np.zeros((N,), np.int32)
        for i, t in enumerate(targets):
            length = int(prefix.lengths[t.row])
            if not 0 <= t.slot < self.num_slots:
                raise ValueError(f"slot {t.slot} is outside [0, {self.num_slots})")
            if t.max_tokens < 1 or length + t.max_tokens > self.max_len:
                raise ValueError(f"max_tokens {t.max_tokens} with a {length}-token prompt does not fit the "
                                 f"{self.max_len}-position cache")
            if len(t.stop_token_ids) > self.max_stop_ids:
                raise ValueError(f"at most {self.max_stop_ids} stop token ids per request")
            if t.top_logprobs > self.num_top:
                raise ValueError(f"at most {self.num_top} top log-probs per token")
            if t.temperature > 0 and t.key is None:
                raise ValueError("sampling at temperature > 0 needs a key")
            rows[i], slots[i], temperature[i], top_k[i], top_p[i] = t.row, t.slot, t.temperature, t.top_k, t.top_p
            keys[i] = 0 if t.key is None else t.key
            want_top[i] = t.top_logprobs
        self.cache, token, logprob, top_ids, top_lp = self._insert(
            self.cache, prefix.entries, prefix.logits, rows, slots, temperature, top_k, top_p, keys, want_top)
        token, logprob = np.asarray(token), np.asarray(logprob)
        s = self.slot
        for i, t in enumerate(targets):
            b = t.slot
            s["tokens"][b] = token[i]
            s["lengths"][b] = prefix.lengths[t.row]
            s["positions"][b] = prefix.positions[t.row]
            s["adapters"][b] = prefix.adapters[t.row]
            s["temperature"][b], s["top_k"][b], s["top_p"][b] = t.temperature, t.top_k, t.top_p
            s["keys"][b] = keys[i]
            s["steps"][b] = 1
            s["remaining"][b] = t.max_tokens - 1
            s["stop_ids"][b] = -1
            s["stop_ids"][b, :len(t.stop_token_ids)] = t.stop_token_ids
            s["want_top"][b] = t.top_logprobs
            s["active"][b] = s["remaining"][b] > 0 and int(token[i]) not in t.stop_token_ids
        n = len(targets)
        return Emitted(token[:n], logprob[:n], np.ones((n,), bool), np.asarray(top_ids)[:n],
                       np.asarray(top_lp)[:n], s["active"].copy())

    def free(self, slot: int) -> None:
        """Stop decoding a slot (its cache entries become stale; a later insert overwrites them)."""
        self.slot["active"][slot] = False

    def window_for(self, steps: int) -> int:
        active = self.slot["active"]
        longest = int(self.slot["lengths"][active].max()) if active.any() else 0
        return pow2_bucket(longest + steps, 16, self.max_len)

    def generate(self, steps: int) -> Emitted:
        """`steps` decode steps for all slots in one call ([steps, B] outputs; `emitted` is False for slots that
        were not active at that step). A slot stops on one of its stop ids or when `max_tokens` are out."""
        steps = pow2_bucket(steps)
        window = self.window_for(steps)
        s = self.slot
        state = {k: s[k] for k in ("tokens", "lengths", "positions", "adapters", "temperature", "top_k", "top_p",
                                   "keys", "steps", "remaining", "active", "stop_ids", "want_top")}
        self.cache, new, out = self._generate(self.lora, self.base, self.cache, state, steps=steps, window=window)
        for k, v in new.items():
            s[k] = np.array(v)
        tokens, logprobs, emitted, top_ids, top_lp = (np.asarray(a) for a in out)
        return Emitted(tokens, logprobs, emitted, top_ids, top_lp, s["active"].copy())
