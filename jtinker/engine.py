"""One base model served to many clients: its model, trainer, adapter slots and one work queue.

Every request (forward, forward_backward, optim_step, saving, sampling) goes through one FIFO queue served by
one worker thread, so a client's requests run in the order it made them and nothing touches the trainer
concurrently. Consecutive forward / forward_backward requests that can share a compiled program (same loss,
config, target shape) run as one batch even when they come from different clients, i.e. different adapter
slots: that is how many users' adapters train together on one frozen base. Requests are validated when they
are made, so a bad one fails alone and never spoils the batch it would have joined; one whose loss or gradient
comes out non-finite anyway fails alone too (the trainer adds nothing for its slot).

Slots are leased: a client holds its slot until it is closed or garbage-collected, then the slot returns to
the pool (sampling snapshots made every RL step would otherwise exhaust the slots).

One FIFO worker means one call that never returns stalls every client of the model, so `health()` reports a
worker that died or a call running longer than `stall_seconds` (and the sampler's own health); while unhealthy,
waiting and new requests fail with the reason instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
import weakref
from pathlib import Path

import numpy as np


class SlotsExhausted(RuntimeError):
    """Every adapter slot of a base model is leased."""


class EngineUnavailable(RuntimeError):
    """The engine's worker died or one call on it has run past `stall_seconds`: the request was not served."""

    @classmethod
    def because(cls, problem: str) -> "EngineUnavailable":
        return cls(f"the training engine is not serving: {problem}")


@dataclasses.dataclass
class _Request:
    future: concurrent.futures.Future
    fn: object = None  # a plain request: fn() -> result
    batch_key: tuple | None = None  # a forward/forward_backward request
    data: list | None = None
    slot: int = 0
    args: tuple = ()
    what: str = "call"  # named in a stall report


class ModelEngine:
    def __init__(self, base_model: str, num_slots: int, max_rank: int, stall_seconds: float = 600.0):
        from configs import load_preset
        from jtinker.trainer import Trainer
        from models.lora import LoraConfig
        from models.registry import load_model

        self.base_model = base_model
        self.lora = LoraConfig(num_slots=num_slots, max_rank=max_rank)
        self.model = load_model(base_model, lora=self.lora)
        self.trainer = Trainer(self.model)
        self.tokenizer_spec = base_model if Path(base_model).is_dir() else load_preset(base_model)["tokenizer"]
        self.stats = {"batches": 0, "batched_requests": 0}
        self._free_slots = list(range(1, num_slots))
        self._slot_lock = threading.Lock()
        self._sampler = None
        self._queue: queue.Queue[_Request] = queue.Queue()
        self.stall_seconds = stall_seconds
        self._busy: tuple[float, str] | None = None  # (monotonic start, what) of the call the worker is running
        self._broken: str | None = None
        self._pending: list[_Request] = []  # taken off the queue by the worker, not all of them started yet
        self._claim_lock = threading.Lock()  # the worker starting a request vs. the watchdog failing it
        self._worker = threading.Thread(target=self._serve, name=f"jtinker-engine-{base_model}", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------------- slots

    def lease_slot(self, owner) -> int:
        """A free slot, returned to the pool when `owner` is garbage-collected (or `release_slot` is called)."""
        with self._slot_lock:
            if not self._free_slots:
                raise SlotsExhausted(f"all {self.lora.num_slots - 1} adapter slots of {self.base_model!r} are in "
                                     "use; close clients you no longer need or start the service with more slots")
            slot = self._free_slots.pop(0)
        weakref.finalize(owner, self.release_slot, slot)
        return slot

    def release_slot(self, slot: int) -> None:
        with self._slot_lock:
            if slot not in self._free_slots:
                self._free_slots.append(slot)

    @property
    def free_slot_count(self) -> int:
        return len(self._free_slots)

    def copy_slot(self, source: int, target: int) -> None:
        """`target` becomes a snapshot of `source`'s adapter (sampler weights), without optimizer state."""
        from jtinker.checkpoints import set_slot_state, slot_state

        set_slot_state(self.trainer, target, slot_state(self.trainer, source, with_optimizer=False),
                       with_optimizer=False)

    @property
    def sampler(self):
        """The continuous-batching sampler (`serving`) over the trainer's live weights."""
        from jtinker.sampler import EngineSampler

        if self._sampler is None:
            self._sampler = EngineSampler(self.trainer, stall_seconds=self.stall_seconds)
        return self._sampler

    # ---------------------------------------------------------------------------------------------- requests

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` on the worker, after everything submitted before it."""
        future = concurrent.futures.Future()
        if self._refuse_while_unhealthy(future):
            return future
        self._queue.put(_Request(future, fn=lambda: fn(*args, **kwargs), what=f"{getattr(fn, '__name__', '')} call"))
        return future

    def submit_forward_backward(self, data, slot: int, loss_fn: str, loss_fn_config: dict | None,
                                backward: bool) -> concurrent.futures.Future:
        """A forward (backward=False) or forward_backward request of one client; it may share a batch with other
        clients' requests. Resolves to a `ForwardBackwardResult` of this request's data only."""
        future = concurrent.futures.Future()
        if self._refuse_while_unhealthy(future):
            return future
        try:
            self.trainer.validate(data, [slot] * len(data), loss_fn, loss_fn_config)
        except Exception as error:  # noqa: BLE001 - reported through the future, as the SDK does
            future.set_exception(error)
            return future
        key = self.trainer.batch_key(data, loss_fn, loss_fn_config, backward)
        self._queue.put(_Request(future, batch_key=key, data=data, slot=slot,
                                 args=(loss_fn, loss_fn_config, backward)))
        return future

    def _serve(self) -> None:
        try:
            self._serve_forever()
        except BaseException as error:  # noqa: BLE001 - recorded, so that health says why nothing is served
            self._broken = f"the engine worker died: {type(error).__name__}: {error}"[:300]
            raise

    def _serve_forever(self) -> None:
        while True:
            pending = [self._queue.get()]
            while True:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._pending = pending
            i = 0
            while i < len(pending):
                j = i + 1
                if pending[i].batch_key is not None:
                    while j < len(pending) and pending[j].batch_key == pending[i].batch_key:
                        j += 1
                    self._busy = (time.monotonic(), f"forward/forward_backward batch of {j - i} request(s)")
                    self._run_batch(pending[i:j])
                else:
                    self._busy = (time.monotonic(), pending[i].what)
                    self._run_plain(pending[i])
                self._busy = None
                i = j
            self._pending = []

    # ------------------------------------------------------------------------------------------------ health

    def health(self, now: float | None = None) -> str | None:
        """None while the worker serves; else why not: it died, or one call has run past `stall_seconds`."""
        if self._broken is not None:
            return self._broken
        if not self._worker.is_alive():
            return "the engine worker thread is not running"
        busy, now = self._busy, time.monotonic() if now is None else now
        if busy is not None and now - busy[0] > self.stall_seconds:
            return f"one {busy[1]} has run for {now - busy[0]:.0f} s (limit {self.stall_seconds:g} s)"
        return None

    def fail_if_stalled(self) -> str | None:
        """The watchdog's call: when the worker or the sampler is unhealthy, fail what waits on it with the
        reason (it would otherwise wait behind a call that does not end). Returns the reason, or None."""
        problem = self.health()
        if problem is not None:
            error = EngineUnavailable.because(problem)
            waiting = list(self._pending)
            while True:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._claim_lock:
                for request in waiting:
                    if not request.future.running() and not request.future.done():
                        request.future.set_running_or_notify_cancel()
                        request.future.set_exception(error)
            return problem
        sampler = self._sampler
        return None if sampler is None else sampler.scheduler.fail_if_stalled()

    def _refuse_while_unhealthy(self, future: concurrent.futures.Future) -> bool:
        problem = self.health()
        if problem is not None:
            future.set_exception(EngineUnavailable.because(problem))
        return problem is not None

    def _claim(self, request: _Request) -> bool:
        """Start `request` unless it was cancelled or the watchdog failed it while it waited."""
        with self._claim_lock:
            return not request.future.done() and request.future.set_running_or_notify_cancel()

    def _run_plain(self, request: _Request) -> None:
        if not self._claim(request):
            return
        try:
            request.future.set_result(request.fn())
        except BaseException as error:  # noqa: BLE001 - surfaced by .result()
            request.future.set_exception(error)

    def _run_batch(self, requests: list[_Request]) -> None:
        from jtinker.losses import NonFiniteError, nonfinite_message
        from jtinker.trainer import ForwardBackwardResult

        requests = [r for r in requests if self._claim(r)]
        if not requests:
            return
        data = [d for r in requests for d in r.data]
        slots = [r.slot for r in requests for _ in r.data]
        try:
            out = self.trainer.run_validated(data, slots, *requests[0].args)
        except BaseException as error:  # noqa: BLE001
            for r in requests:
                r.future.set_exception(error)
            return
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(requests)
        start = 0
        for r in requests:
            stop = start + len(r.data)
            if r.slot in out.nonfinite_slots:  # only this slot's request fails; the batch's others are unaffected
                r.future.set_exception(NonFiniteError(nonfinite_message((), requests[0].args[2])))
                start = stop
                continue
            terms = out.elementwise_loss[start:stop]
            loss = float(sum(np.sum(t, dtype=np.float64) for t in terms))
            r.future.set_result(ForwardBackwardResult(loss=loss, logprobs=out.logprobs[start:stop],
                                                      elementwise_loss=terms, metrics={"loss:sum": loss}))
            start = stop
