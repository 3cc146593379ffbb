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

Admission cannot leak: everything about a request (types, ranges, finiteness, its seed's keys) is checked in
`submit`, before it has a queue position, and a round that fails after taking decode slots gives every one of
them back. Admission is first come, first served, so one lost slot would stall every later request that needs
all of them; `health()` therefore also checks the slot accounting itself, and reports a thread that died or a
round that has run for longer than `stall_seconds`. While unhealthy, queued requests fail and new ones are
refused with the reason, instead of waiting forever.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

from models.checks import check_token_ids
from serving.engine import Engine, Target
from serving.sampling import request_key


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_k: int = -1  # <= 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request; any integer in [-2**63, 2**64)
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


MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-4  # below it, logits / temperature can overflow: use 0 (greedy)
SEED_RANGE = (-(1 << 63), 1 << 64)


class SchedulerUnavailable(RuntimeError):
    """The scheduler is stalled or closed: the request was not (or no longer) served."""


def check_sampling_params(p: SamplingParams, *, vocab_size: int) -> None:
    """Raise a one-line ValueError for anything the engine cannot take exactly as asked: wrong types, NaN or
    infinite floats, values out of range, a seed too large for a key, stop ids outside the vocabulary."""
    def integer(name, value, low, high):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value < high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}), got {value!r}")

    def real(name, value, low, high, low_open=False):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not (
                (low < value if low_open else low <= value) and value <= high):
            raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}], "
                             f"got {value!r}")

    if p.max_tokens is None:
        raise ValueError("max_tokens must be an integer >= 0, got None")
    integer("max_tokens", p.max_tokens, 0, 1 << 31)
    real("temperature", p.temperature, 0.0, MAX_TEMPERATURE)
    if 0 < p.temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {p.temperature!r}")
    integer("top_k", p.top_k, -(1 << 31), 1 << 31)
    real("top_p", p.top_p, 0.0, 1.0, low_open=True)
    if p.seed is not None:
        integer("seed", p.seed, *SEED_RANGE)
    for token in p.stop_token_ids:
        integer("stop token id", token, 0, vocab_size)
    if not all(isinstance(s, str) and s for s in p.stop_strings):
        raise ValueError("stop strings must be non-empty strings")
    integer("top_logprobs", p.top_logprobs, 0, 1 << 31)


@dataclasses.dataclass
class _Job:
    request: Request
    future: Future
    max_tokens: int
    samples: list[Sample]
    keys: list  # per sample: its key (uint32 [2]), or None when greedy
    prompt_logprobs: list | None = None
    open: int = 0


class Scheduler:
    def __init__(self, engine: Engine, *, chunk: int = 8, decode: Callable[[list[int]], str] | None = None,
                 stall_seconds: float = 600.0):
        self.engine, self.chunk, self.decode = engine, chunk, decode
        self.stall_seconds = stall_seconds
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._free = list(range(engine.num_slots))
        self._live: dict[int, tuple[_Job, int]] = {}  # slot -> (job, sample index)
        self._thread: threading.Thread | None = None
        self._cancelled: set[Future] = set()
        self._closing = False
        self._round_started: float | None = None  # monotonic time the running round began
        self._broken: str | None = None  # a fault that does not heal (a dead thread, lost slots)
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
            problem = self.health()
            if problem is not None:
                future.set_exception(SchedulerUnavailable(f"the sampler is not serving: {problem}"))
                return future
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
        """Everything about a request, checked and worked out before it may take a queue position or a slot."""
        engine, p = self.engine, request.params
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in request.prompt):
            raise ValueError("prompt must be a list of integer token ids")
        prompt = [int(t) for t in request.prompt]
        check_token_ids(prompt, engine.vocab_size, "prompt")
        if len(prompt) >= engine.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; this sampler takes at most {engine.max_len - 1}")
        check_sampling_params(p, vocab_size=engine.vocab_size)
        if isinstance(request.num_samples, bool) or not isinstance(request.num_samples, numbers.Integral) or \
                not 1 <= request.num_samples <= engine.num_slots:
            raise ValueError(f"num_samples must be an integer in [1, {engine.num_slots}], got {request.num_samples!r}")
        if isinstance(request.first_sample, bool) or not isinstance(request.first_sample, numbers.Integral) or \
                not 0 <= request.first_sample < 1 << 31:
            raise ValueError(f"first_sample must be an integer in [0, 2**31), got {request.first_sample!r}")
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
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little")
        keys = [request_key(seed, request.first_sample + i) if p.temperature > 0 else None
                for i in range(request.num_samples)] if max_tokens else []
        return _Job(request, future, max_tokens, samples if max_tokens else [], keys)

    # ----------------------------------------------------------------------------------------------- the loop

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jtinker-sampler", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop the loop; what is still queued or decoding fails with SchedulerUnavailable."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None
        self._fail_queued(SchedulerUnavailable("the sampler was closed"))
        with self._cond:
            if self._thread is None:  # stopped: it may be stepped by hand or started again
                self._closing = False

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    # Wait while nothing can change: no work, or (only if slots were lost) a head that never fits.
                    while not self._closing and not self._cancelled and not self._live and (
                            not self._queue or len(self._queue[0].samples) > len(self._free)):
                        self._cond.wait(1.0 if self._queue else None)
                    if self._closing:
                        break
                try:
                    self.step()
                except Exception as error:  # noqa: BLE001 - a failed compile fails what is in flight, not the loop
                    self._fail_all(error)
        except BaseException as error:  # noqa: BLE001 - recorded, so that health says why nothing is served
            self._broken = f"the sampler thread died: {type(error).__name__}: {error}"
            raise
        finally:
            if self._broken is not None:
                self._fail_queued(SchedulerUnavailable(f"the sampler is not serving: {self._broken}"))

    # --------------------------------------------------------------------------------------------- health

    def health(self, now: float | None = None) -> str | None:
        """None while the scheduler serves; else why not (its thread died, decode slots were lost, or one round
        has run for longer than `stall_seconds`). Cheap: read without the loop's lock where that is safe."""
        if self._broken is not None:
            return self._broken
        if self._closing:
            return "the sampler was closed"
        if self._thread is not None and not self._thread.is_alive():
            return "the sampler thread is not running"
        lost = self.engine.num_slots - len(self._free) - len(self._live)
        if lost and self._round_started is None:  # between rounds the two lists account for every slot
            self._broken = f"{lost} decode slot(s) of {self.engine.num_slots} are lost"
            return self._broken
        started = self._round_started
        now = time.monotonic() if now is None else now
        if started is not None and now - started > self.stall_seconds:
            return f"one sampling round has run for {now - started:.0f} s (limit {self.stall_seconds:.0f} s)"
        return None

    def fail_if_stalled(self) -> str | None:
        """The watchdog's call: when unhealthy, fail every queued request with the reason (they would otherwise
        wait behind a round that does not end). Returns the reason, or None."""
        problem = self.health()
        if problem is not None:
            self._fail_queued(SchedulerUnavailable(f"the sampler is not serving: {problem}"))
        return problem

    def _fail_queued(self, error: BaseException) -> None:
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(error)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """One round: admit what fits, then one decode chunk. True while requests are queued or decoding."""
        self._round_started = time.monotonic()
        try:
            self._reap_cancelled()
            self._admit()
            if self._live:
                self._decode()
        finally:
            self._round_started = None
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
        """Prefill the jobs' prompts and insert their samples into free slots. Slots are taken only once every
        target is built, and all go back if the insert fails (the caller fails the jobs)."""
        engine = self.engine
        prefix = engine.prefill([j.request.prompt for j in jobs], [j.request.adapter for j in jobs],
                                prompt_logprobs=any(j.request.prompt_logprobs for j in jobs),
                                images=jobs[0].request.images)
        planned = []  # (row, job, sample index)
        for row, job in enumerate(jobs):
            request = job.request
            if request.prompt_logprobs:
                n = len(request.prompt)
                job.prompt_logprobs = [None] + [float(v) for v in prefix.prompt_logprobs[row, :n - 1]]
            if not job.samples:
                job.future.set_result(Result([], job.prompt_logprobs))
                continue
            planned += [(row, job, i) for i in range(len(job.samples))]
        if not planned:
            return
        slots, self._free = self._free[:len(planned)], self._free[len(planned):]
        targets, owners = [], []
        for (row, job, i), slot in zip(planned, slots):
            p = job.request.params
            targets.append(Target(row=row, slot=slot, max_tokens=job.max_tokens, temperature=p.temperature,
                                  top_k=p.top_k, top_p=p.top_p, key=job.keys[i],
                                  stop_token_ids=tuple(p.stop_token_ids)[:engine.max_stop_ids],
                                  top_logprobs=p.top_logprobs))
            owners.append((job, i, slot))
            self._live[slot] = (job, i)
            job.open += 1
        try:
            first = engine.insert(prefix, targets)
        except BaseException:
            for slot in slots:
                self._release(slot)
            raise
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
