"""Sampling endpoints: create_sampling_session, samplers/{id}, asample (a future of a protobuf SampleResponse).

A sampler is a durable row naming its base model and its adapter source (a checkpoint folder, a snapshot file,
or none for the base model); the adapter is loaded into a slot only while it is being used (see runtime).
"""

from __future__ import annotations

import time

from fastapi import Request

from jtinker import operations
from jtinker.server import requests, wire
from jtinker.server.common import future, owner, runtime, tinker_router
from jtinker.server.runtime import Failure, Result

router = tinker_router()


@router.post("/create_sampling_session")
async def create_sampling_session(data: requests.CreateSamplingSession, request: Request):
    rt, who = runtime(request), owner(request)
    session_id, seq = data.session_id, data.sampling_session_seq_id
    rt.session(who, session_id)
    model_path, base_model, source = data.model_path, data.base_model, None
    if model_path:
        _, folder = rt.checkpoint(who, model_path)
        base_model = base_model or operations.read_meta(folder)["base_model"]
        source = str(folder)
    elif not base_model:
        raise Failure("create_sampling_session needs model_path or base_model")
    engine = rt.engine(base_model)
    sampler_id = f"{session_id}:sample:{seq}"
    rt.store.execute("INSERT OR REPLACE INTO samplers (sampler_id, owner, session_id, base_model, model_path, "
                     "source, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (sampler_id, who, session_id, engine.base_model, model_path, source, time.time()))
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


def _sampler(rt, who: str, sampler_id: str):
    row = rt.store.one("SELECT * FROM samplers WHERE sampler_id=?", (sampler_id,))
    if row is None or row["owner"] != who:
        raise Failure(f"unknown sampler {sampler_id!r}", status=404)
    return row


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request):
    row = _sampler(runtime(request), owner(request), sampler_id)
    return {"sampler_id": sampler_id, "base_model": row["base_model"], "model_path": row["model_path"]}


_UNSUPPORTED = ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")


@router.post("/asample")
async def asample(data: requests.Sample, request: Request):
    rt, who = runtime(request), owner(request)
    sampler_id, num_samples, model_path = data.sampling_session_id, data.num_samples, data.model_path
    if sampler_id is None:  # older SDKs: sample straight from a base model or a path
        base_model, source, dedupe = data.base_model, None, None
    else:
        row = _sampler(rt, who, sampler_id)
        base_model, source, model_path = row["base_model"], row["source"], row["model_path"]
        dedupe = None if data.seq_id is None else f"{sampler_id}#{data.seq_id}"
    if model_path:  # checked on every request: unpublishing, deleting or expiry revoke at once
        _, folder = rt.checkpoint(who, model_path)
        if sampler_id is None:
            base_model, source = operations.read_meta(folder)["base_model"], str(folder)
    engine = rt.engine(base_model)
    request_id, new = rt.new_future(who, "sample", dedupe)
    sequence_ids = [f"{request_id}:{i}" for i in range(num_samples)]
    if not new:
        return future(request_id, sample_sequence_ids=sequence_ids)
    try:
        tokens = wire.json_tokens(data.prompt.model_dump())
        params = data.sampling_params
        for name in _UNSUPPORTED:
            if getattr(data, name):
                raise Failure(f"{name} is not supported by this server yet")
        if data.target_prompt_logprobs is not None:
            raise Failure("target_prompt_logprobs is not supported by this server yet")
    except (Failure, wire.WireError) as error:
        rt.fail(request_id, error)
        return future(request_id, sample_sequence_ids=sequence_ids)

    def run():
        slot = rt.sampler_slot(engine, source)
        samples, prompt_lp = operations.sample(
            engine, slot, tokens, num_samples, max_tokens=params.max_tokens, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p, seed=params.seed, stop=params.stop,
            prompt_logprobs=bool(data.prompt_logprobs), prompt_logprobs_last_n=data.prompt_logprobs_last_n)
        return Result(wire.sample_response(samples, prompt_lp), wire.PROTO)

    rt.attach(request_id, engine.submit(run))
    return future(request_id, sample_sequence_ids=sequence_ids)
