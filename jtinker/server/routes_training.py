"""Training endpoints: create_model, get_info, forward_backward, optim_step, save/load weights.

Each future-returning request is checked up front (owner, run, names) and then queued in the run's seq_id
order; the work itself runs on the base model's engine worker, where results become the SDK's wire types.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pydantic
from fastapi import Request
from fastapi.exceptions import RequestValidationError

from jtinker import operations
from jtinker.optim import AdamParams
from jtinker.server import requests, wire
from jtinker.server.common import future, owner, raw_body, runtime, stored_metadata, tinker_router
from jtinker.server.runtime import Failure, LiveModel, Result, _Lease, json_result
from jtinker.server.store import dumps

router = tinker_router()


def _lora(config: dict) -> dict:
    return {k: bool(config.get(k, True)) for k in ("train_attn", "train_mlp", "train_unembed")}


def _check_optimizer(config: requests.OptimizerConfig | None) -> None:
    kind = "adamw" if config is None else config.type
    if kind != "adamw":
        raise Failure(f"optimizer {kind!r} is not supported by this server (only 'adamw')")


@router.post("/create_model")
async def create_model(data: requests.CreateModel, request: Request):
    rt, who = runtime(request), owner(request)
    session_id, seq, base_model = data.session_id, data.model_seq_id, data.base_model
    rt.session(who, session_id)
    stored_metadata(request, "user_metadata", data.user_metadata)
    lora_config = (data.lora_config or requests.LoraConfig()).model_dump()
    model_id = f"{session_id}:train:{seq}"
    request_id, new = rt.new_future(who, "create_model", dedupe=f"{model_id}#create")
    if not new:
        return future(request_id, model_id=model_id)
    try:
        _check_optimizer(data.optimizer_config)
        engine = rt.engine(base_model)
        rank = lora_config["rank"]
        if not 1 <= rank <= engine.lora.max_rank:
            raise Failure(f"LoRA rank must be in [1, {engine.lora.max_rank}] for {base_model!r}, got {rank}")
    except Failure as error:
        rt.fail(request_id, error)
        return future(request_id, model_id=model_id)
    model = LiveModel(model_id, who, session_id, engine, rank, _lora(lora_config))

    def create():
        model.holder = _Lease()
        model.slot = rt.lease(engine, model.holder)
        operations.new_adapter(engine, model.slot, rank=rank, seed=lora_config["seed"], **model.lora)
        rt.models[model_id] = model
        return json_result({"model_id": model_id, "type": "create_model"},
                           [rt.add_run(model, data.user_metadata)])

    rt.attach(request_id, engine.submit(create))
    return future(request_id, model_id=model_id)


@router.post("/get_info")
async def get_info(data: requests.ModelRequest, request: Request):
    rt, who = runtime(request), owner(request)
    model_id = data.model_id
    row = rt.store.one("SELECT * FROM runs WHERE run_id=?", (model_id,))
    if row is None or row["owner"] != who:
        raise Failure(f"unknown model_id {model_id!r}", status=404)
    engine = rt.engine(row["base_model"])
    return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": row["rank"],
            "model_name": row["base_model"], "optimizer_config": {"type": "adamw"},
            "model_data": {"arch": engine.model.config.model_type, "model_name": row["base_model"],
                           "tokenizer_id": tokenizer_id(engine)}}


def tokenizer_id(engine) -> str:
    """A local tokenizer folder: `AutoTokenizer.from_pretrained` (the SDK's `get_tokenizer`) loads it offline."""
    from models.tokenizer import resolve_tokenizer_dir

    return str(resolve_tokenizer_dir(engine.tokenizer_spec))


def _touch(model_id: str) -> tuple:
    """The statement that records a request for the run (its last_request time), committed with the result."""
    return ("UPDATE runs SET last_request=? WHERE run_id=?", (time.time(), model_id))


_FORWARD_BACKWARD_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": requests.ForwardBackward.model_json_schema()},
    wire.PROTO: {"schema": {"type": "string", "format": "binary",
                            "description": "tinker.proto ForwardBackwardRequest (what the SDK sends)"}}}}}


@router.post("/forward_backward", openapi_extra=_FORWARD_BACKWARD_BODY)
async def forward_backward(request: Request):
    return await _forward_backward(request, forward_only=None)


@router.post("/forward", openapi_extra=_FORWARD_BACKWARD_BODY)
async def forward(request: Request):
    return await _forward_backward(request, forward_only=True)


async def _forward_backward(request: Request, forward_only: bool | None):
    rt, who = runtime(request), owner(request)
    raw = await raw_body(request)
    if wire.PROTO not in request.headers.get("content-type", ""):
        try:  # types and bounds: a 400 naming the field
            requests.ForwardBackward.model_validate(await request.json())
        except pydantic.ValidationError as error:
            raise RequestValidationError(error.errors()) from error
    try:
        parsed = await asyncio.to_thread(wire.parse_forward_backward, raw, request.headers.get("content-type", ""))
    except wire.WireError as error:
        raise Failure(str(error)) from error
    backward = not (parsed["forward_only"] if forward_only is None else forward_only)
    kind = "forward_backward" if backward else "forward"
    model, failed = rt.run_or_failed(who, parsed["model_id"], kind)
    if failed:
        return future(failed, model_id=parsed["model_id"])

    request.state.run_request = (parsed["model_id"], parsed["seq_id"])  # a refusal from here on settles its seq_id

    def start():
        config = wire.loss_config_floats(parsed["loss_fn_config"])
        f = model.engine.submit_forward_backward(parsed["data"], model.slot, str(parsed["loss_fn"]), config, backward)

        def convert(out):
            return Result(wire.forward_backward_output(out.logprobs, out.elementwise_loss, out.metrics), wire.PROTO,
                          (_touch(model.model_id),))

        return f, convert

    return future(rt.ordered(model, kind, parsed["seq_id"], start), model_id=model.model_id)


async def _on_run(request: Request, data: requests.RunRequest, kind: str, make_start):
    """A request on a training run, queued in the run's seq_id order: the owner and the run are checked first
    (a failed future if not), then `make_start(rt, model, data)` gives the `start` that `Runtime.ordered` runs
    in turn."""
    rt, who = runtime(request), owner(request)
    model, failed = rt.run_or_failed(who, data.model_id, kind)
    if failed:
        return future(failed, model_id=data.model_id)
    return future(rt.ordered(model, kind, data.seq_id, make_start(rt, model, data)), model_id=data.model_id)


@router.post("/optim_step")
async def optim_step(data: requests.OptimStep, request: Request):
    return await _on_run(request, data, "optim_step", _optim_step)


def _optim_step(rt, model: LiveModel, data: requests.OptimStep):
    params = data.adam_params or data.optim_params or data.optimizer_params or requests.AdamParams()
    adam = AdamParams(**params.model_dump(exclude={"type"}))

    def start():
        def step():
            metrics = model.engine.trainer.optim_step(model.slot, adam)
            return json_result({"metrics": metrics, "type": "optim_step"}, [_touch(model.model_id)])

        return model.engine.submit(step), lambda r: r

    return start


def _checkpoint_sql(model: LiveModel, kind: str, name: str, size: int, data: requests.SaveWeights,
                    save_id: str) -> tuple:
    ttl = data.ttl_seconds
    now = time.time()
    return ("INSERT OR REPLACE INTO checkpoints (run_id, checkpoint_id, owner, kind, created, size_bytes, public, "
            "expires_at, user_metadata, save_id) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            (model.model_id, f"{kind}/{name}", model.owner, "training" if kind == "weights" else "sampler", now,
             size, None if ttl is None else now + ttl, dumps(data.user_metadata), save_id))


def _start_named_save(rt, model: LiveModel, kind: str, name: str, data: requests.SaveWeights, result_type: str):
    """Check the name, then save on the engine's queue (in order with the run's other requests). The save is
    atomic: written beside the checkpoint, swapped in, and only then committed with its row and result; an
    overwritten checkpoint is removed after that commit (a crash before it rolls back at restart)."""
    operations.check_name(name)
    folder = rt.state_dir / model.model_id / kind / name

    def save():
        row = rt.store.one("SELECT 1 FROM checkpoints WHERE run_id=? AND checkpoint_id=?",
                           (model.model_id, f"{kind}/{name}"))
        if row is not None and kind == "weights" and not data.overwrite:
            raise Failure(f"checkpoint tinker://{model.model_id}/{kind}/{name} exists; save with overwrite=True "
                          "to replace it")
        save_id = uuid.uuid4().hex
        staging, size = operations.write_checkpoint(model.engine, model.slot, folder, with_optimizer=kind == "weights",
                                                    meta={"rank": model.rank, **model.lora}, save_id=save_id)
        old = operations.install_checkpoint(staging, folder)
        rt.forget_sampler(model.engine, str(folder.resolve()))
        result = json_result({"path": f"tinker://{model.model_id}/{kind}/{name}", "type": result_type},
                             [_checkpoint_sql(model, kind, name, size, data, save_id), _touch(model.model_id)])
        if old is not None:
            result.after_commit = lambda: operations.remove_tree(old)
        return result

    return model.engine.submit(save), lambda r: r


@router.post("/save_weights")
async def save_weights(data: requests.SaveWeights, request: Request):
    stored_metadata(request, "user_metadata", data.user_metadata)
    return await _on_run(request, data, "save_weights", _save_weights)


def _save_weights(rt, model: LiveModel, data: requests.SaveWeights):
    name = data.path or f"ckpt-{int(time.time() * 1000)}"
    return lambda: _start_named_save(rt, model, "weights", name, data, "save_weights")


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(data: requests.SaveWeightsForSampler, request: Request):
    stored_metadata(request, "user_metadata", data.user_metadata)
    return await _on_run(request, data, "save_weights_for_sampler", _save_weights_for_sampler)


def _save_weights_for_sampler(rt, model: LiveModel, data: requests.SaveWeightsForSampler):
    name = data.path

    def start():
        if name is None:  # ephemeral: a snapshot that only a sampling session refers to
            seq = data.sampling_session_seq_id
            if seq is None:
                raise Failure("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
            sampler_id = f"{model.session_id}:sample:{seq}"
            file = (rt.state_dir / "_samplers" / f"{sampler_id}.npz").resolve()

            def snapshot():
                operations.save_snapshot(model.engine, model.slot, file)
                rt.forget_sampler(model.engine, str(file))
                sql = ("INSERT OR REPLACE INTO samplers (sampler_id, owner, session_id, base_model, model_path, "
                       "source, created) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                       (sampler_id, model.owner, model.session_id, model.engine.base_model, str(file),
                        time.time()))
                return json_result({"path": None, "sampling_session_id": sampler_id,
                                    "type": "save_weights_for_sampler"}, [sql, _touch(model.model_id)])

            return model.engine.submit(snapshot), lambda r: r
        return _start_named_save(rt, model, "sampler_weights", name, data, "save_weights_for_sampler")

    return start


@router.post("/load_weights")
async def load_weights(data: requests.LoadWeights, request: Request):
    rt, who = runtime(request), owner(request)
    path, with_optimizer = data.path, data.optimizer
    stored_metadata(request, "user_metadata", data.user_metadata)
    if data.model_id is not None:  # legacy: load into an existing run, in its seq_id order
        model = rt.live_model(who, data.model_id)

        def start():
            _, folder = rt.checkpoint(who, path, kinds=("weights",))

            def load():
                operations.load_checkpoint(model.engine, model.slot, folder, with_optimizer)
                return json_result({"path": path, "model_id": model.model_id, "type": "load_weights"})

            return model.engine.submit(load), lambda r: r

        return future(rt.ordered(model, "load_weights", data.seq_id, start), model_id=model.model_id)

    if data.session_id is None or data.model_seq_id is None:
        raise Failure("load_weights needs model_id, or session_id and model_seq_id")
    session_id, seq = data.session_id, data.model_seq_id
    rt.session(who, session_id)
    model_id = f"{session_id}:train:{seq}"
    request_id, new = rt.new_future(who, "load_weights", dedupe=f"{model_id}#create")
    if not new:
        return future(request_id, model_id=model_id)
    try:
        _, folder = rt.checkpoint(who, path, kinds=("weights",))
        meta = operations.read_meta(folder)
        engine = rt.engine(data.base_model or meta["base_model"])
        if not with_optimizer:
            _check_optimizer(data.optimizer_config)
    except Failure as error:
        rt.fail(request_id, error)
        return future(request_id, model_id=model_id)
    model = LiveModel(model_id, who, session_id, engine, int(meta["rank"]), _lora(meta))

    def load():
        model.holder = _Lease()
        model.slot = rt.lease(engine, model.holder)
        operations.load_checkpoint(engine, model.slot, folder, with_optimizer)
        rt.models[model_id] = model
        return json_result({"path": path, "model_id": model_id, "type": "load_weights"},
                           [rt.add_run(model, data.user_metadata)])

    rt.attach(request_id, engine.submit(load))
    return future(request_id, model_id=model_id)


@router.post("/unload_model")
async def unload_model(data: requests.ModelRequest, request: Request):
    rt, who = runtime(request), owner(request)
    model_id = data.model_id
    model = rt.live_model(who, model_id)
    request_id, _ = rt.new_future(who, "unload_model")
    rt.release(model)
    rt.store.finish_future(request_id, "done", wire.JSON, json.dumps({"model_id": model_id,
                                                                       "type": "unload_model"}).encode())
    return future(request_id, model_id=model_id)
