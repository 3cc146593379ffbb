"""Session plumbing the SDK needs before and between requests: client config, sessions and heartbeats,
telemetry, health, capabilities, and `retrieve_future` (long-polled: the SDK re-polls at once on try_again)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request, Response

from jtinker.server import requests, wire
from jtinker.server.common import owner, runtime, stored_metadata, tinker_router
from jtinker.server.runtime import Failure
from jtinker.server.store import dumps

router = tinker_router()

# Flags the SDK reads at start-up (tinker.types.ClientConfigResponse); everything else keeps its default.
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False, "parallel_fwdbwd_chunks": True,
                 "sample_use_retrieve_futures": False, "custom_loss_server_side": False,
                 "sample_join_sampling_session": False}


@router.post("/client/config")
async def client_config(request: Request):
    owner(request)
    return request.app.state.client_config


@router.post("/client/dynamic_config")
async def client_dynamic_config(request: Request):
    owner(request)
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.get("/healthz")
async def healthz(request: Request):
    """200 while every engine and sampler serves; 503 with the reason when one is stalled or its thread died."""
    problems = runtime(request).health()
    if problems:
        return Response(json.dumps({"status": "unhealthy", "detail": "; ".join(problems)}), status_code=503,
                        media_type=wire.JSON)
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def get_server_capabilities(request: Request):
    owner(request)
    return {"supported_models": [
        {"model_name": name, "max_context_length": engine.model.config.max_position_embeddings, "trainable": True,
         "sampleable": True} for name, engine in runtime(request).engines.items()]}


@router.post("/create_session")
async def create_session(data: requests.CreateSession, request: Request):
    rt, who = runtime(request), owner(request)
    stored_metadata(request, "user_metadata", data.user_metadata)
    stored_metadata(request, "tags", data.tags)
    session_id = uuid.uuid4().hex
    now = time.time()
    rt.store.execute("INSERT INTO sessions (session_id, owner, created, heartbeat, tags, user_metadata) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (session_id, who, now, now, dumps(data.tags or []),
                                                   dumps(data.user_metadata)))
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
async def session_heartbeat(data: requests.SessionHeartbeat, request: Request):
    rt, who = runtime(request), owner(request)
    session_id = data.session_id
    row = rt.session(who, session_id)
    if row["finished"]:
        raise Failure(f"session {session_id!r} has finished", status=410)
    rt.store.execute("UPDATE sessions SET heartbeat=? WHERE session_id=?", (time.time(), session_id))
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request):
    rt = runtime(request)
    rt.session(owner(request), session_id)
    rt.store.execute("UPDATE sessions SET finished=1 WHERE session_id=?", (session_id,))
    rt.end_session(session_id)
    return {"status": "ok"}


@router.post("/telemetry")
async def telemetry(request: Request):
    owner(request)
    return {"status": "accepted"}


@router.post("/retrieve_future")
async def retrieve_future(data: requests.RetrieveFuture, request: Request):
    rt, who = runtime(request), owner(request)
    request_id = data.request_id
    row = rt.store.future(request_id)
    if row is None or row["owner"] != who:
        return Response(json.dumps({"error": f"unknown request_id {request_id!r}", "category": "user"}),
                        media_type=wire.JSON)
    row = await rt.wait(request_id, rt.poll_seconds)
    if row["status"] == "pending":
        return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    if row["content_type"] == wire.PROTO and wire.PROTO not in request.headers.get("accept", ""):
        return wire.proto_to_json(row["kind"], row["body"])
    return Response(row["body"], media_type=row["content_type"])
