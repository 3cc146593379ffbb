"""Training endpoints: create_model, get_info, forward_backward, optim_step, save/load weights.

Each future-returning request is checked up front (owner, run, names) and then queued in the run's seq_id
order; the work itself runs on the base model's engine worker, where results become the SDK's wire types.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from jtinker import operations
from jtinker.optim import AdamParams
from jtinker.server import wire
from jtinker.server.common import body, future, owner, raw_body, require, runtime
from jtinker.server.runtime import Failure, LiveModel, Result, _Lease, json_result
from jtinker.server.store import dumps

router = APIRouter(prefix="/api/v1")


def _lora(config: dict) -> dict:
    return {k: bool(config.get(k, True)) for k in ("train_attn", "train_mlp", "train_unembed")}


def _check_optimizer(config: dict | None) -> None:
    kind = (config or {}).get("type", "adamw")
    if kind != "adamw":
        raise Failure(f"optimizer {kind!r} is not supported by this server (only 'adamw')")


@router.post("/create_model")
async def create_model(request: Request):
    rt, who, data = runtime(request), owner(request), await body(request)
    session_id, seq, base_model = require(data, "session_id", "model_seq_id", "base_model")
    rt.session(who, session_id)
    lora_config = data.get("lora_config") or {}
    model_id = f"{session_id}:train:{seq}"
    request_id, new = rt.new_future(who, "create_model", dedupe=f"{model_id}#create")
    if not new:
        return future(request_id, model_id=model_id)
    try:
        _check_optimizer(data.get("optimizer_config"))
        engine = rt.engine(base_model)
        rank = int(lora_config.get("rank", 32))
        if not 1 <= rank <= engine.lora.max_rank:
            raise Failure(f"LoRA rank must be in [1, {engine.lora.max_rank}] for {base_model!r}, got {rank}")
    except Failure as error:
        rt.fail(request_id, error)
        return future(request_id, model_id=model_id)
    model = LiveModel(model_id, who, session_id, engine, rank, _lora(lora_config))

    def create():
        model.holder = _Lease()
        model.slot = rt.lease(engine, model.holder)
        operations.new_adapter(engine, model.slot, rank=rank, seed=lora_config.get("seed"), **model.lora)
        rt.models[model_id] = model
        return json_result({"model_id": model_id, "type": "create_model"},
                           [rt.add_run(model, data.get("user_metadata"))])

    rt.attach(request_id, engine.submit(create))
    return future(request_id, model_id=model_id)


@router.post("/get_info")
async def get_info(request: Request):
    rt, who, data = runtime(request), owner(request), await body(request)
    (model_id,) = require(data, "model_id")
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


@router.post("/forward_backward")
async def forward_backward(request: Request):
    return await _forward_backward(request, forward_only=None)


@router.post("/forward")
async def forward(request: Request):
    return await _forward_backward(request, forward_only=True)


async def _forward_backward(request: Request, forward_only: bool | None):
    rt, who = runtime(request), owner(request)
    raw = await raw_body(request)
    try:
        parsed = wire.parse_forward_backward(raw, request.headers.get("content-type", ""))
    except wire.WireError as error:
        raise Failure(str(error)) from error
    backward = not (parsed["forward_only"] if forward_only is None else forward_only)
    kind = "forward_backward" if backward else "forward"
    model, failed = rt.run_or_failed(who, parsed["model_id"], kind)
    if failed:
        return future(failed, model_id=parsed["model_id"])

    def start():
        config = wire.loss_config_floats(parsed["loss_fn_config"])
        f = model.engine.submit_forward_backward(parsed["data"], model.slot, str(parsed["loss_fn"]), config, backward)

        def convert(out):
            return Result(wire.forward_backward_output(out.logprobs, out.elementwise_loss, out.metrics), wire.PROTO,
                          (_touch(model.model_id),))

        return f, convert

    return future(rt.ordered(model, kind, parsed["seq_id"], start), model_id=model.model_id)


async def _on_run(request: Request, kind: str, make_start):
    """A request on a training run, queued in the run's seq_id order: the owner and the run are checked first
    (a failed future if not), then `make_start(rt, model, data)` gives the `start` that `Runtime.ordered` runs
    in turn."""
    rt, who, data = runtime(request), owner(request), await body(request)
    (model_id,) = require(data, "model_id")
    model, failed = rt.run_or_failed(who, model_id, kind)
    if failed:
        return future(failed, model_id=model_id)
    return future(rt.ordered(model, kind, data.get("seq_id"), make_start(rt, model, data)), model_id=model_id)


@router.post("/optim_step")
async def optim_step(request: Request):
    return await _on_run(request, "optim_step", _optim_step)


def _optim_step(rt, model: LiveModel, data: dict):
    params = data.get("adam_params") or data.get("optim_params") or data.get("optimizer_params") or {}

    def start():
        if params.get("type", "adam") not in ("adam", "adamw"):
            raise Failure(f"optimizer {params.get('type')!r} is not supported by this server (only AdamParams)")
        fields = AdamParams.__dataclass_fields__
        unknown = sorted(set(params) - set(fields) - {"type"})
        if unknown:
            raise Failure(f"unknown adam_params field(s): {', '.join(unknown)}")
        adam = AdamParams(**{k: float(v) for k, v in params.items() if k in fields})

        def step():
            metrics = model.engine.trainer.optim_step(model.slot, adam)
            return json_result({"metrics": metrics, "type": "optim_step"}, [_touch(model.model_id)])

        return model.engine.submit(step), lambda r: r

    return start


def _checkpoint_sql(model: LiveModel, kind: str, name: str, size: int, data: dict) -> tuple:
    ttl = data.get("ttl_seconds")
    now = time.time()
    return ("INSERT OR REPLACE INTO checkpoints (run_id, checkpoint_id, owner, kind, created, size_bytes, public, "
            "expires_at, user_metadata) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            (model.model_id, f"{kind}/{name}", model.owner, "training" if kind == "weights" else "sampler", now,
             size, None if ttl is None else now + float(ttl), dumps(data.get("user_metadata"))))


def _save(rt, model: LiveModel, kind: str, name: str, data: dict, with_optimizer: bool):
    folder = rt.state_dir / model.model_id / kind / name
    row = rt.store.one("SELECT 1 FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (model.model_id,
                                                                                      f"{kind}/{name}"))
    if row is not None and kind == "weights" and not data.get("overwrite", False):
        raise Failure(f"checkpoint tinker://{model.model_id}/{kind}/{name} exists; save with overwrite=True to "
                      "replace it")
    size = operations.save_checkpoint(model.engine, model.slot, folder, with_optimizer=with_optimizer,
                                      meta={"rank": model.rank, **model.lora})
    rt.forget_sampler(model.engine, str(folder.resolve()))
    return size


def _start_named_save(rt, model: LiveModel, kind: str, name: str, data: dict, result_type: str):
    """Check the name, then save on the engine's queue (in order with the run's other requests); the result and
    the checkpoint row are stored together."""
    operations.check_name(name)

    def save():
        size = _save(rt, model, kind, name, data, with_optimizer=kind == "weights")
        return json_result({"path": f"tinker://{model.model_id}/{kind}/{name}", "type": result_type},
                           [_checkpoint_sql(model, kind, name, size, data), _touch(model.model_id)])

    return model.engine.submit(save), lambda r: r


@router.post("/save_weights")
async def save_weights(request: Request):
    return await _on_run(request, "save_weights", _save_weights)


def _save_weights(rt, model: LiveModel, data: dict):
    name = data.get("path") or f"ckpt-{int(time.time() * 1000)}"
    return lambda: _start_named_save(rt, model, "weights", name, data, "save_weights")


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request):
    return await _on_run(request, "save_weights_for_sampler", _save_weights_for_sampler)


def _save_weights_for_sampler(rt, model: LiveModel, data: dict):
    name = data.get("path")

    def start():
        if name is None:  # ephemeral: a snapshot that only a sampling session refers to
            seq = data.get("sampling_session_seq_id")
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
async def load_weights(request: Request):
    rt, who, data = runtime(request), owner(request), await body(request)
    (path,) = require(data, "path")
    with_optimizer = bool(data.get("optimizer", False))
    if data.get("model_id") is not None:  # legacy: load into an existing run, in its seq_id order
        model = rt.live_model(who, data["model_id"])

        def start():
            _, folder = rt.checkpoint(who, path, kinds=("weights",))

            def load():
                operations.load_checkpoint(model.engine, model.slot, folder, with_optimizer)
                return json_result({"path": path, "model_id": model.model_id, "type": "load_weights"})

            return model.engine.submit(load), lambda r: r

        return future(rt.ordered(model, "load_weights", data.get("seq_id"), start), model_id=model.model_id)

    session_id, seq = require(data, "session_id", "model_seq_id")
    rt.session(who, session_id)
    model_id = f"{session_id}:train:{seq}"
    request_id, new = rt.new_future(who, "load_weights", dedupe=f"{model_id}#create")
    if not new:
        return future(request_id, model_id=model_id)
    try:
        _, folder = rt.checkpoint(who, path, kinds=("weights",))
        meta = operations.read_meta(folder)
        engine = rt.engine(data.get("base_model") or meta["base_model"])
        if not with_optimizer:
            _check_optimizer(data.get("optimizer_config"))
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
                           [rt.add_run(model, data.get("user_metadata"))])

    rt.attach(request_id, engine.submit(load))
    return future(request_id, model_id=model_id)


@router.post("/unload_model")
async def unload_model(request: Request):
    rt, who, data = runtime(request), owner(request), await body(request)
    (model_id,) = require(data, "model_id")
    model = rt.live_model(who, model_id)
    request_id, _ = rt.new_future(who, "unload_model")
    rt.release(model)
    rt.store.finish_future(request_id, "done", wire.JSON, json.dumps({"model_id": model_id,
                                                                       "type": "unload_model"}).encode())
    return future(request_id, model_id=model_id)
