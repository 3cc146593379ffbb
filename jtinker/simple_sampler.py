"""A simple sampler over the trainer's live weights: one whole-sequence forward per new token (no KV cache).

It is correct and fast enough for tiny models, and it gives the training client a `SamplingClient` until the
continuous-batching engine of `serving/` (issue 6) takes over. Lengths are bucketed to powers of two so a few
programs serve every request. Sampled-token log-probs are those of the distribution sampled from
(log-softmax of logits / temperature; the model's own at temperature 1), before top-k / top-p truncation.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jtinker.trainer import Trainer, bucket


class SimpleSampler:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer

        def next_logits(lora, base, tokens, mask, slots, last):
            model = trainer._merge(lora, base)
            h, _ = model.hidden_states(tokens, attention_mask_BT=mask, adapter_ids_B=slots)
            h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
            return model.logits(h_last, slots)[:, 0].astype(jnp.float32)

        def prompt_logprobs(lora, base, tokens, mask, slots, targets):
            model = trainer._merge(lora, base)
            h, _ = model.hidden_states(tokens, attention_mask_BT=mask, adapter_ids_B=slots)
            return model.target_logprobs(h, targets[..., None], slots)[..., 0]

        self._next_logits = jax.jit(next_logits)
        self._prompt_logprobs = jax.jit(prompt_logprobs)

    def prompt_logprobs(self, tokens: list[int], slot: int) -> list[float | None]:
        """log p(token i | tokens < i) for every prompt token; None for the first."""
        n = len(tokens)
        T = bucket(n)
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = tokens
        targets = np.zeros((1, T), np.int32)
        targets[0, :n - 1] = tokens[1:]
        mask = (np.arange(T) < n)[None].astype(np.int32)
        lp = self._prompt_logprobs(self.trainer.lora, self.trainer.base, ids, mask, np.array([slot], np.int32),
                                   targets)
        return [None] + [float(v) for v in np.asarray(lp)[0, :n - 1]]

    def sample(self, prompt: list[int], slot: int, num_samples: int, *, max_tokens: int, temperature: float = 1.0,
               top_k: int = -1, top_p: float = 1.0, seed: int | None = None, stop_token_ids=(), stop_strings=(),
               decode=None):
        """[(tokens, logprobs, stop_reason)] per sample; stop tokens are kept at the end of `tokens`."""
        vocab = self.trainer.vocab_size
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt must be non-empty token ids in [0, {vocab})")
        if max_tokens is None or max_tokens < 1:
            raise ValueError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
        key = jax.random.key(int.from_bytes(os.urandom(4), "little") if seed is None else seed)
        rows = [list(prompt) for _ in range(num_samples)]
        logprobs = [[] for _ in range(num_samples)]
        done = [None] * num_samples
        slots = np.full((num_samples,), slot, np.int32)
        for step in range(max_tokens):
            n = len(rows[0])
            T = bucket(n)
            ids = np.zeros((num_samples, T), np.int32)
            ids[:, :n] = rows
            mask = np.broadcast_to(np.arange(T) < n, (num_samples, T)).astype(np.int32)
            logits = self._next_logits(self.trainer.lora, self.trainer.base, ids, mask, slots,
                                       np.full((num_samples,), n - 1, np.int32))
            chosen, chosen_lp = _choose(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
            for r in range(num_samples):
                if done[r] is not None:
                    rows[r].append(0)  # keeps the batch rectangular; never returned
                    continue
                token = int(chosen[r])
                rows[r].append(token)
                logprobs[r].append(float(chosen_lp[r]))
                if token in stop_token_ids or (stop_strings and decode is not None and any(
                        s in decode(rows[r][len(prompt):]) for s in stop_strings)):
                    done[r] = "stop"
            if all(d is not None for d in done):
                break
        out = []
        for r in range(num_samples):
            generated = rows[r][len(prompt):len(prompt) + len(logprobs[r])]
            out.append((generated, logprobs[r], done[r] or "length"))
        return out


def _choose(logits, key, temperature: float, top_k: int, top_p: float):
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        scaled = logits
        tokens = logits.argmax(-1)
    else:
        scaled = logits / temperature
        masked = scaled.copy()
        if top_k and top_k > 0:
            kth = np.sort(masked, axis=-1)[:, -min(top_k, masked.shape[-1])][:, None]
            masked = np.where(masked < kth, -np.inf, masked)
        if top_p < 1.0:
            order = np.argsort(-masked, axis=-1)
            probs = np.exp(masked - masked.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            sorted_probs = np.take_along_axis(probs, order, -1)
            keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p  # the token that crosses p stays
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            masked = np.where(keep, masked, -np.inf)
        tokens = np.asarray(jax.random.categorical(key, jnp.asarray(masked)))
    log_probs = scaled - scaled.max(-1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return tokens, np.take_along_axis(log_probs, tokens[:, None], -1)[:, 0]
