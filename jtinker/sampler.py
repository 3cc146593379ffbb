"""The training platform's sampler (`sample`, `prompt_logprobs`), backed by `serving`'s continuous-batching
engine over the trainer's live weights.

Each call hands the engine the trainer's current LoRA arrays (and base state, which holds the adapter scales)
as arguments, so new adapter weights apply at once and nothing recompiles. The scheduler runs in its own
thread: samples from several callers share decode steps.
"""

from __future__ import annotations

from jtinker.trainer import Trainer
from models.checks import check_token_ids


def _cache_length(max_positions: int, cap: int = 4096) -> int:
    """The largest power of two <= the model's context (at most `cap`): prompt + samples must fit."""
    return min(cap, 1 << (max(16, max_positions).bit_length() - 1))


class EngineSampler:
    def __init__(self, trainer: Trainer, *, num_slots: int = 16, chunk: int = 16, max_len: int | None = None,
                 stall_seconds: float = 600.0):
        from serving.engine import Engine
        from serving.scheduler import Scheduler

        self.trainer = trainer
        model = trainer.model()
        cfg = getattr(model, "language_model", model).config
        self.engine = Engine(model, num_slots=num_slots, max_len=max_len or _cache_length(cfg.max_position_embeddings),
                             max_prefill_batch=8, num_top_logprobs=20)
        self.scheduler = Scheduler(self.engine, chunk=chunk, stall_seconds=stall_seconds).start()

    def refresh(self) -> None:
        """Point the sampling engine at the trainer's current LoRA and base weights (no copy, no recompile)."""
        self.engine.update_lora(self.trainer.lora, self.trainer.base)

    def _check_prompt(self, prompt: list[int]) -> None:
        check_token_ids(prompt, self.trainer.vocab_size, "prompt")

    def prompt_logprobs(self, tokens: list[int], slot: int) -> list[float | None]:
        """log p(token i | tokens < i) for every prompt token; None for the first."""
        from serving.scheduler import Request, SamplingParams

        self._check_prompt(tokens)
        self.refresh()
        request = Request(list(tokens), SamplingParams(max_tokens=0), adapter=slot, prompt_logprobs=True)
        return self.scheduler.submit(request).result().prompt_logprobs

    def sample(self, prompt: list[int], slot: int, num_samples: int, *, max_tokens: int, temperature: float = 1.0,
               top_k: int = -1, top_p: float = 1.0, seed: int | None = None, stop_token_ids=(), stop_strings=(),
               decode=None):
        """[(tokens, logprobs, stop_reason)] per sample; stop tokens are kept at the end of `tokens`."""
        import os

        from serving.scheduler import Request, SamplingParams

        self._check_prompt(prompt)
        if max_tokens is None or max_tokens < 1:
            raise ValueError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
        if seed is None:  # one seed for every part of a request split over the slots
            seed = int.from_bytes(os.urandom(4), "little")
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                                top_k=-1 if top_k is None else top_k, top_p=1.0 if top_p is None else top_p,
                                seed=seed, stop_token_ids=tuple(stop_token_ids), stop_strings=tuple(stop_strings))
        self.refresh()
        per_request = self.engine.num_slots
        futures = [self.scheduler.submit(Request(list(prompt), params, num_samples=min(per_request, num_samples - i),
                                                 adapter=slot, first_sample=i, decode=decode))
                   for i in range(0, num_samples, per_request)]
        return [(s.tokens, s.logprobs, s.stop_reason) for f in futures for s in f.result().samples]
