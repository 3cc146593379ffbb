"""The in-process Tinker API: the official SDK's client names, arguments and return types over jtinker's
training engine, so `import jtinker as tinker` runs existing Tinker training code with no server.

Requests are queued when they are made (as the SDK sends them at once) and return futures with `.result()`
that can also be awaited. Each base model gets one engine (`jtinker.engine.ModelEngine`: model, trainer,
adapter slots, one work queue that batches different clients' forward_backward calls together); each training
or sampling client leases one slot until it is garbage-collected. LoRA alpha is 32 for every rank, as in Tinker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from pathlib import Path

import numpy as np

from jtinker import operations
from jtinker.engine import ModelEngine
from jtinker.operations import LORA_ALPHA  # noqa: F401 - part of this module's surface

_COMPOSITE = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="jtinker-client")


class Future:
    """A request in flight: `.result(timeout=None)`, `await future`, `.done()`."""

    def __init__(self, inner: concurrent.futures.Future):
        self._inner = inner

    def result(self, timeout: float | None = None):
        return self._inner.result(timeout)

    def done(self) -> bool:
        return self._inner.done()

    def __await__(self):
        return asyncio.wrap_future(self._inner).__await__()


def _then(future: concurrent.futures.Future, convert) -> Future:
    """A future of `convert(result)`; errors pass through."""
    inner = concurrent.futures.Future()

    def done(f):
        try:
            inner.set_result(convert(f.result()))
        except BaseException as error:  # noqa: BLE001
            inner.set_exception(error)

    future.add_done_callback(done)
    return Future(inner)


class ServiceClient:
    def __init__(self, *, state_dir: str | os.PathLike | None = None, num_slots: int = 8, max_rank: int = 64,
                 **_ignored):
        self.state_dir = Path(state_dir or os.environ.get("JTINKER_STATE_DIR", "jtinker-state")).resolve()
        self.num_slots, self.max_rank = num_slots, max_rank
        self._engines: dict[str, ModelEngine] = {}

    def _engine(self, base_model: str) -> ModelEngine:
        if base_model not in self._engines:
            self._engines[base_model] = ModelEngine(base_model, self.num_slots, self.max_rank)
        return self._engines[base_model]

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict | None = None, **_ignored) -> "TrainingClient":
        engine = self._engine(base_model)
        if not 1 <= rank <= engine.lora.max_rank:
            raise ValueError(f"LoRA rank must be in [1, {engine.lora.max_rank}] for {base_model!r}, got {rank}")
        client = TrainingClient(self, engine, rank, run_id=uuid.uuid4().hex[:12])
        engine.submit(operations.new_adapter, engine, client.slot, rank=rank, seed=seed, train_attn=train_attn,
                      train_mlp=train_mlp, train_unembed=train_unembed).result()
        return client

    def create_training_client_from_state(self, path: str, base_model: str | None = None, **_ignored):
        return self._from_state(path, base_model, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None, **_ignored):
        return self._from_state(path, base_model, with_optimizer=True)

    def _from_state(self, path: str, base_model: str | None, with_optimizer: bool) -> "TrainingClient":
        folder = self.resolve(path, kinds=("weights",))
        meta = operations.read_meta(folder)
        engine = self._engine(base_model or meta["base_model"])
        client = TrainingClient(self, engine, meta["rank"], run_id=uuid.uuid4().hex[:12])
        engine.submit(operations.load_checkpoint, engine, client.slot, folder, with_optimizer).result()
        return client

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               **_ignored) -> "SamplingClient":
        """The base model (`base_model`) or a saved adapter (`model_path`: a tinker:// sampler_weights or
        weights path)."""
        if model_path is None:
            if base_model is None:
                raise ValueError("create_sampling_client needs model_path or base_model")
            return SamplingClient(self._engine(base_model), lease=False)
        folder = self.resolve(model_path)
        engine = self._engine(base_model or operations.read_meta(folder)["base_model"])
        client = SamplingClient(engine)
        engine.submit(operations.load_checkpoint, engine, client.slot, folder, False).result()
        return client

    def resolve(self, path: str, kinds: tuple[str, ...] = operations.KINDS) -> Path:
        """`tinker://{run}/{kind}/{name}` -> its folder in the state directory (names cannot escape it)."""
        return operations.checkpoint_folder(self.state_dir, path, kinds)


class TrainingClient:
    def __init__(self, service: ServiceClient, engine: ModelEngine, rank: int, run_id: str):
        self.service, self.engine, self.rank, self.run_id = service, engine, rank, run_id
        self.slot = engine.lease_slot(self)

    def _datums(self, data):
        from jtinker.trainer import Datum

        return [Datum(np.asarray(d.model_input.to_ints(), np.int64),
                      {k: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v) for k, v in
                       d.loss_fn_inputs.items()}) for d in data]

    def _forward(self, data, loss_fn, loss_fn_config, backward) -> Future:
        from tinker import types

        def convert(out):
            outputs = [{"logprobs": types.TensorData.from_numpy(lp.astype(np.float32)),
                        "elementwise_loss": types.TensorData.from_numpy(e.astype(np.float32))}
                       for lp, e in zip(out.logprobs, out.elementwise_loss)]
            return types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
                                               metrics=out.metrics)

        try:
            datums = self._datums(data)
        except Exception as error:  # noqa: BLE001 - reported through the future
            failed = concurrent.futures.Future()
            failed.set_exception(error)
            return Future(failed)
        return _then(self.engine.submit_forward_backward(datums, self.slot, str(loss_fn), loss_fn_config, backward),
                     convert)

    def forward(self, data, loss_fn, loss_fn_config: dict | None = None) -> Future:
        return self._forward(data, loss_fn, loss_fn_config, False)

    def forward_backward(self, data, loss_fn, loss_fn_config: dict | None = None) -> Future:
        return self._forward(data, loss_fn, loss_fn_config, True)

    def forward_backward_custom(self, data, loss_fn) -> Future:
        """A loss written in torch over the log-probs, as the SDK does it: a forward gives the log-probs, the
        user's `loss_fn(data, logprobs) -> (loss, metrics)` runs with autograd, and a cross-entropy backward
        with weights -dLoss/dlogp applies exactly that gradient. Needs each datum's `target_tokens`."""
        from tinker import types

        def run():
            import torch

            def with_weights(datum, weights):
                targets = datum.loss_fn_inputs["target_tokens"]
                targets = targets.to_numpy() if hasattr(targets, "to_numpy") else np.asarray(targets)
                return types.Datum(model_input=datum.model_input, loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(np.asarray(targets)),
                    "weights": types.TensorData.from_numpy(np.asarray(weights, np.float32))})

            zero = [with_weights(d, np.zeros(d.model_input.length)) for d in data]
            forward = self._forward(zero, "cross_entropy", None, False).result()
            logprobs = [torch.tensor(o["logprobs"].to_numpy(), requires_grad=True) for o in forward.loss_fn_outputs]
            loss, metrics = loss_fn(data, logprobs)
            loss.backward()
            weighted = [with_weights(d, -lp.grad.numpy()) for d, lp in zip(data, logprobs)]
            out = self._forward(weighted, "cross_entropy", None, True).result()
            return types.ForwardBackwardOutput(
                loss_fn_output_type=out.loss_fn_output_type, loss_fn_outputs=out.loss_fn_outputs,
                metrics={**{k: float(v) for k, v in (metrics or {}).items()}, "loss:sum": float(loss.detach())})

        return Future(_COMPOSITE.submit(run))  # not on the engine's worker: it waits on engine requests

    def optim_step(self, adam_params) -> Future:
        from tinker import types

        from jtinker.optim import AdamParams

        def step():
            params = AdamParams(**{f: getattr(adam_params, f) for f in AdamParams.__dataclass_fields__})
            return types.OptimStepResponse(metrics=self.engine.trainer.optim_step(self.slot, params))

        return Future(self.engine.submit(step))

    def _save(self, kind: str, name: str | None, with_optimizer: bool) -> concurrent.futures.Future:
        """Resolves to the tinker:// path of a checkpoint of this adapter as it is once earlier requests ran."""
        name = name or f"ephemeral-{uuid.uuid4().hex[:12]}"
        try:
            operations.check_name(name)
        except ValueError as error:
            failed = concurrent.futures.Future()
            failed.set_exception(error)
            return failed

        def save():
            operations.save_checkpoint(self.engine, self.slot, self.service.state_dir / self.run_id / kind / name,
                                       with_optimizer=with_optimizer, meta={"rank": self.rank})
            return f"tinker://{self.run_id}/{kind}/{name}"

        return self.engine.submit(save)

    def save_state(self, name: str, ttl_seconds: int | None = None, **_ignored) -> Future:
        """Training state (adapter and optimizer): `tinker://RUN/weights/NAME`."""
        from tinker import types

        return _then(self._save("weights", name, True), lambda path: types.SaveWeightsResponse(path=path))

    def save_weights_for_sampler(self, name: str | None = None, ttl_seconds: int | None = None,
                                 **_ignored) -> Future:
        """The adapter only, for sampling: `tinker://RUN/sampler_weights/NAME`."""
        from tinker import types

        return _then(self._save("sampler_weights", name, False),
                     lambda path: types.SaveWeightsForSamplerResponse(path=path))

    def load_state(self, path: str) -> Future:
        return self._load(path, False)

    def load_state_with_optimizer(self, path: str) -> Future:
        return self._load(path, True)

    def _load(self, path, with_optimizer) -> Future:
        def load():
            operations.load_checkpoint(self.engine, self.slot, self.service.resolve(path, kinds=("weights",)),
                                       with_optimizer)

        return Future(self.engine.submit(load))

    def save_weights_and_get_sampling_client(self, name: str | None = None, **_ignored) -> "SamplingClient":
        """A sampling client on a snapshot of this adapter as it is once earlier requests ran (training then
        continues separately). The snapshot's slot returns to the pool when the client is garbage-collected."""
        client = SamplingClient(self.engine)
        self.engine.submit(self.engine.copy_slot, self.slot, client.slot).result()
        return client

    def get_info(self):
        from tinker import types
        from tinker.types._pydantic_types.get_info_response import ModelData

        cfg = self.engine.model.config
        return types.GetInfoResponse(model_data=ModelData(arch=cfg.model_type, model_name=self.engine.base_model,
                                                          tokenizer_id=str(self.engine.tokenizer_spec)),
                                     model_id=self.run_id, is_lora=True, lora_rank=self.rank,
                                     model_name=self.engine.base_model)

    def get_tokenizer(self):
        from models.tokenizer import load_tokenizer

        return load_tokenizer(self.engine.tokenizer_spec)


class SamplingClient:
    def __init__(self, engine: ModelEngine, lease: bool = True):
        """`lease`: take an adapter slot (for a saved adapter); without it, the client samples the base model."""
        self.engine = engine
        self.slot = engine.lease_slot(self) if lease else 0

    def get_base_model(self) -> str:
        return self.engine.base_model

    def get_tokenizer(self):
        from models.tokenizer import load_tokenizer

        return load_tokenizer(self.engine.tokenizer_spec)

    def sample(self, prompt, num_samples: int, sampling_params, include_prompt_logprobs: bool = False,
               **_ignored) -> Future:
        from tinker import types

        def run():
            samples, prompt_lp = operations.sample(
                self.engine, self.slot, list(prompt.to_ints()), num_samples, max_tokens=sampling_params.max_tokens,
                temperature=sampling_params.temperature, top_k=sampling_params.top_k, top_p=sampling_params.top_p,
                seed=sampling_params.seed, stop=sampling_params.stop, prompt_logprobs=include_prompt_logprobs)
            sequences = [types.SampledSequence(stop_reason=reason, sequence_id=uuid.uuid4().hex,
                                               tokens_np=np.asarray(out, np.int32),
                                               logprobs_np=np.asarray(lps, np.float32))
                         for out, lps, reason in samples]
            if prompt_lp is not None:
                prompt_lp = np.asarray([np.nan if v is None else v for v in prompt_lp], np.float32)
            return types.SampleResponse(sequences=sequences, prompt_logprobs_np=prompt_lp)

        return Future(self.engine.submit(run))

    def compute_logprobs(self, prompt, prompt_logprobs_last_n: int | None = None) -> Future:
        def run():
            values = self.engine.sampler.prompt_logprobs(list(prompt.to_ints()), self.slot)
            if prompt_logprobs_last_n is not None:
                values = [None] * (len(values) - prompt_logprobs_last_n) + values[len(values) - prompt_logprobs_last_n:]
            return values

        return Future(self.engine.submit(run))
