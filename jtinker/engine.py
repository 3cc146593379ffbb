"""One base model served to many clients: its model, trainer, adapter slots and one work queue.

Every request (forward, forward_backward, optim_step, saving, sampling) goes through one FIFO queue served by
one worker thread, so a client's requests run in the order it made them and nothing touches the trainer
concurrently. Consecutive forward / forward_backward requests that can share a compiled program (same loss,
config, target shape) run as one batch even when they come from different clients, i.e. different adapter
slots: that is how many users' adapters train together on one frozen base. Requests are validated when they
are made, so a bad one fails alone and never spoils the batch it would have joined.

Slots are leased: a client holds its slot until it is closed or garbage-collected, then the slot returns to
the pool (sampling snapshots made every RL step would otherwise exhaust the slots).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import weakref
from pathlib import Path

import numpy as np


class SlotsExhausted(RuntimeError):
    """Every adapter slot of a base model is leased."""


@dataclasses.dataclass
class _Request:
    future: concurrent.futures.Future
    fn: object = None  # a plain request: fn() -> result
    batch_key: tuple | None = None  # a forward/forward_backward request
    data: list | None = None
    slot: int = 0
    args: tuple = ()


class ModelEngine:
    def __init__(self, base_model: str, num_slots: int, max_rank: int):
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
        threading.Thread(target=self._serve, name=f"jtinker-engine-{base_model}", daemon=True).start()

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
            self._sampler = EngineSampler(self.trainer)
        return self._sampler

    # ---------------------------------------------------------------------------------------------- requests

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` on the worker, after everything submitted before it."""
        future = concurrent.futures.Future()
        self._queue.put(_Request(future, fn=lambda: fn(*args, **kwargs)))
        return future

    def submit_forward_backward(self, data, slot: int, loss_fn: str, loss_fn_config: dict | None,
                                backward: bool) -> concurrent.futures.Future:
        """A forward (backward=False) or forward_backward request of one client; it may share a batch with other
        clients' requests. Resolves to a `ForwardBackwardResult` of this request's data only."""
        future = concurrent.futures.Future()
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
        while True:
            pending = [self._queue.get()]
            while True:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            i = 0
            while i < len(pending):
                j = i + 1
                if pending[i].batch_key is not None:
                    while j < len(pending) and pending[j].batch_key == pending[i].batch_key:
                        j += 1
                    self._run_batch(pending[i:j])
                else:
                    self._run_plain(pending[i])
                i = j

    @staticmethod
    def _run_plain(request: _Request) -> None:
        if not request.future.set_running_or_notify_cancel():
            return
        try:
            request.future.set_result(request.fn())
        except BaseException as error:  # noqa: BLE001 - surfaced by .result()
            request.future.set_exception(error)

    def _run_batch(self, requests: list[_Request]) -> None:
        from jtinker.trainer import ForwardBackwardResult

        requests = [r for r in requests if r.future.set_running_or_notify_cancel()]
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
            terms = out.elementwise_loss[start:stop]
            loss = float(sum(np.sum(t, dtype=np.float64) for t in terms))
            r.future.set_result(ForwardBackwardResult(loss=loss, logprobs=out.logprobs[start:stop],
                                                      elementwise_loss=terms, metrics={"loss:sum": loss}))
            start = stop
