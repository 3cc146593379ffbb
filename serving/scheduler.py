"""Continuous batching over the engine: requests join free decode slots between `generate` calls while other
slots keep decoding, and leave as soon as they stop.

A plain Python class: `submit` (thread-safe) queues a request and returns a `concurrent.futures.Future` of its
`Result`; `start()` runs the loop in a background thread, or a caller drives it with `step()` /
`run_until_idle()` (tests use that to control exactly when requests arrive). `on_token` streams tokens as they
are produced, so an HTTP layer can stream on top.

Each round: admit waiting requests in arrival order while their samples fit the free slots (`num_samples`
samples share one prefill; prompts of one length bucket are prefilled together), then run one chunk of decode
steps for every slot. Host-side checks (stop strings, stop ids beyond the engine's device list) end a sample
at the exact token, whatever the device computed past it in the same chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from serving.engine import Engine, Target
from serving.sampling import request_key


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_k: int = -1  # <= 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()  # the stop token is kept at the end of the sample
    stop_strings: tuple[str, ...] = ()  # needs a `decode`; the token completing the string is kept
    top_logprobs: int = 0  # how many of the most likely tokens' log-probs to report per position


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    num_samples: int = 1
    adapter: int = 0  # LoRA adapter slot; 0 is the base model
    prompt_logprobs: bool = False
    images: tuple | None = None  # Qwen3-VL: (pixel_values, grid_thw per image) for the prompt's image pads
    first_sample: int = 0  # sample i uses key (seed, first_sample + i): a request split in parts keeps its keys
    on_token: Callable[[int, int, float], None] | None = None  # (sample index, token, log-prob)
    decode: Callable[[list[int]], str] | None = None  # tokens -> text, for stop strings


@dataclasses.dataclass
class Sample:
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    stop_reason: str | None  # "stop" or "length"


@dataclasses.dataclass
class Result:
    samples: list[Sample]
    prompt_logprobs: list[float | None] | None  # log p(prompt[i] | prompt[:i]); None for the first token


@dataclasses.dataclass
class _Job:
    request: Request
    future: Future
    max_tokens: int
    samples: list[Sample]
    prompt_logprobs: list | None = None
    open: int = 0


class Scheduler:
    def __init__(self, engine: Engine, *, chunk: int = 8, decode: Callable[[list[int]], str] | None = None):
        self.engine, self.chunk, self.decode = engine, chunk, decode
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._free = list(range(engine.num_slots))
        self._live: dict[int, tuple[_Job, int]] = {}  # slot -> (job, sample index)
        self._thread: threading.Thread | None = None
        self._cancelled: set[Future] = set()
        self._closing = False
        self.rounds = 0

    # ------------------------------------------------------------------------------------------- submission

    def submit(self, request: Request) -> Future:
        """Queue a request; its future resolves to a `Result` (or raises its validation error)."""
        future: Future = Future()
        try:
            job = self._job(request, future)
        except Exception as error:  # noqa: BLE001 - reported through the future
            future.set_exception(error)
            return future
        with self._cond:
            self._queue.append(job)
            self._cond.notify()
        return future

    def cancel(self, future: Future) -> None:
        """Drop a request (e.g. its client went away): queued, it never starts; decoding, its slots free up
        before the next round. Its future ends cancelled."""
        with self._cond:
            self._cancelled.add(future)
            self._cond.notify()

    def _reap_cancelled(self) -> None:
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            self._queue = collections.deque(j for j in self._queue if j.future not in cancelled)
        for slot, (job, _) in list(self._live.items()):
            if job.future in cancelled:
                self._release(slot)
        for future in cancelled:
            future.cancel()  # never set running, so this takes (unless it has already finished)

    def stream(self, request: Request) -> tuple[Future, Iterator[tuple[int, int, float]]]:
        """Submit, and iterate (sample index, token, log-prob) as tokens are produced; the iterator ends with
        the request (raising its error, if it failed). For streaming HTTP responses."""
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        user = request.on_token

        def on_token(i: int, token: int, logprob: float) -> None:
            if user is not None:
                user(i, token, logprob)
            tokens.put((i, token, logprob))

        future = self.submit(dataclasses.replace(request, on_token=on_token))
        future.add_done_callback(lambda _: tokens.put(None))  # after the last token: same thread, in order

        def iterate():
            while (item := tokens.get()) is not None:
                yield item
            future.result()

        return future, iterate()

    def _job(self, request: Request, future: Future) -> _Job:
        engine, p = self.engine, request.params
        prompt = [int(t) for t in request.prompt]
        if not prompt or min(prompt) < 0 or max(prompt) >= engine.vocab_size:
            raise ValueError(f"prompt must be non-empty token ids in [0, {engine.vocab_size})")
        if len(prompt) >= engine.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; this sampler takes at most {engine.max_len - 1}")
        if p.max_tokens is None or p.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {p.max_tokens}")
        if not 1 <= request.num_samples <= engine.num_slots:
            raise ValueError(f"num_samples must be in [1, {engine.num_slots}], got {request.num_samples}")
        if p.temperature < 0 or not 0 < p.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {p.temperature}, {p.top_p}")
        if not 0 <= p.top_logprobs <= engine.num_top:
            raise ValueError(f"top_logprobs must be in [0, {engine.num_top}], got {p.top_logprobs}")
        if not 0 <= request.adapter < engine.num_adapters:
            raise ValueError(f"adapter slot {request.adapter} is outside [0, {engine.num_adapters})")
        if request.images is not None and not engine.takes_images:
            raise ValueError("this model takes no images")
        if p.stop_strings and (request.decode or self.decode) is None:
            raise ValueError("stop strings need a decode function (tokenizer)")
        request = dataclasses.replace(request, prompt=prompt)
        max_tokens = min(p.max_tokens, engine.max_len - len(prompt))  # the cache holds prompt + samples
        samples = [Sample([], [], [] if p.top_logprobs else None, None) for _ in range(request.num_samples)]
        return _Job(request, future, max_tokens, samples if max_tokens else [])

    # ----------------------------------------------------------------------------------------------- the loop

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jtinker-sampler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self._live and not self._cancelled:
                    self._cond.wait()
                if self._closing:
                    return
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - a failed compile fails what is in flight, not the loop
                self._fail_all(error)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """One round: admit what fits, then one decode chunk. True while requests are queued or decoding."""
        self._reap_cancelled()
        self._admit()
        if self._live:
            self._decode()
        self.rounds += 1
        with self._cond:
            return bool(self._queue or self._live)

    @property
    def busy_slots(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------------------------------- the rounds

    def _admit(self) -> None:
        admitted = []
        with self._cond:
            free = len(self._free)
            while self._queue:
                job = self._queue[0]
                need = len(job.samples)
                if need > free:
                    break  # first come, first served: no overtaking, so nobody starves
                free -= need
                admitted.append(self._queue.popleft())
        if not admitted:
            return
        engine = self.engine
        groups: dict[object, list[_Job]] = collections.defaultdict(list)
        for job in admitted:  # prompts with images are prefilled alone (their grids shape the program)
            key = id(job) if job.request.images is not None else engine.prompt_bucket(len(job.request.prompt))
            groups[key].append(job)
        for jobs in groups.values():
            for start in range(0, len(jobs), engine.max_prefill_batch):
                batch = jobs[start:start + engine.max_prefill_batch]
                try:
                    self._prefill_and_insert(batch)
                except Exception as error:  # noqa: BLE001 - these requests fail, the others go on
                    for job in batch:
                        self._fail(job, error)

    def _prefill_and_insert(self, jobs: list[_Job]) -> None:
        engine = self.engine
        prefix = engine.prefill([j.request.prompt for j in jobs], [j.request.adapter for j in jobs],
                                prompt_logprobs=any(j.request.prompt_logprobs for j in jobs),
                                images=jobs[0].request.images)
        targets, owners = [], []
        for row, job in enumerate(jobs):
            request, p = job.request, job.request.params
            if request.prompt_logprobs:
                n = len(request.prompt)
                job.prompt_logprobs = [None] + [float(v) for v in prefix.prompt_logprobs[row, :n - 1]]
            if not job.samples:
                job.future.set_result(Result([], job.prompt_logprobs))
                continue
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little")
            for i in range(len(job.samples)):
                slot = self._free.pop(0)
                targets.append(Target(row=row, slot=slot, max_tokens=job.max_tokens, temperature=p.temperature,
                                      top_k=p.top_k, top_p=p.top_p,
                                      key=request_key(seed, request.first_sample + i) if p.temperature > 0
                                      else None,
                                      stop_token_ids=tuple(p.stop_token_ids)[:engine.max_stop_ids],
                                      top_logprobs=p.top_logprobs))
                owners.append((job, i, slot))
                self._live[slot] = (job, i)
                job.open += 1
        if not targets:
            return
        first = engine.insert(prefix, targets)
        for n, (job, i, slot) in enumerate(owners):
            self._accept(slot, job, i, int(first.tokens[n]), float(first.logprobs[n]), first.top_ids[n],
                         first.top_logprobs[n])

    def _decode(self) -> None:
        engine = self.engine
        out = engine.generate(self.chunk)  # one step count: one compile per attention window
        for j in range(out.tokens.shape[0]):
            for slot in np.flatnonzero(out.emitted[j]):
                slot = int(slot)
                if slot in self._live:
                    job, i = self._live[slot]
                    self._accept(slot, job, i, int(out.tokens[j, slot]), float(out.logprobs[j, slot]),
                                 out.top_ids[j, slot], out.top_logprobs[j, slot])

    def _accept(self, slot: int, job: _Job, i: int, token: int, logprob: float, top_ids, top_lps) -> None:
        request, p = job.request, job.request.params
        sample = job.samples[i]
        sample.tokens.append(token)
        sample.logprobs.append(logprob)
        if p.top_logprobs:
            sample.top_logprobs.append([(int(t), float(v)) for t, v in zip(top_ids[:p.top_logprobs],
                                                                              top_lps[:p.top_logprobs])])
        if request.on_token is not None:
            request.on_token(i, token, logprob)
        decode = request.decode or self.decode
        reason = None
        if token in p.stop_token_ids or (p.stop_strings and any(s in decode(sample.tokens) for s in p.stop_strings)):
            reason = "stop"
        elif len(sample.tokens) >= job.max_tokens:
            reason = "length"
        if reason is None:
            return
        sample.stop_reason = reason
        self._release(slot)
        job.open -= 1
        if job.open == 0 and all(s.stop_reason for s in job.samples):
            job.future.set_result(Result(job.samples, job.prompt_logprobs))

    def _release(self, slot: int) -> None:
        self.engine.free(slot)
        del self._live[slot]
        self._free.append(slot)
        self._free.sort()

    def _fail(self, job: _Job, error: BaseException) -> None:
        for slot, (owner, _) in list(self._live.items()):
            if owner is job:
                self._release(slot)
        if not job.future.done():
            job.future.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        for job in {id(j): j for j, _ in self._live.values()}.values():
            self._fail(job, error)
