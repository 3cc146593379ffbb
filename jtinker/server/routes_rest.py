"""The RestClient's endpoints: training runs, checkpoints (list, delete, TTL, publish), weights_info, sessions.

A tenant sees only its own runs and checkpoints; a published checkpoint is readable (weights_info, loading,
sampling) by every tenant but still listed, changed and deleted only by its owner.
"""

from __future__ import annotations

import datetime
import time

from typing import Annotated

from fastapi import Query, Request

from jtinker import operations
from jtinker.server import requests
from jtinker.server.common import owner, runtime, tinker_router
from jtinker.server.runtime import Failure
from jtinker.server.store import loads

router = tinker_router()
Limit = Annotated[int, Query(ge=1, le=10_000)]
Offset = Annotated[int, Query(ge=0, lt=1 << 62)]


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def checkpoint_json(row) -> dict:
    return {"checkpoint_id": row["checkpoint_id"], "checkpoint_type": row["kind"], "time": _iso(row["created"]),
            "tinker_path": f"tinker://{row['run_id']}/{row['checkpoint_id']}", "size_bytes": row["size_bytes"],
            "public": bool(row["public"]), "user_metadata": loads(row["user_metadata"]),
            "expires_at": _iso(row["expires_at"])}


def _live_checkpoints(rt, sql: str, args=()) -> list:
    now = time.time()
    return [r for r in rt.store.execute(sql, args) if r["expires_at"] is None or r["expires_at"] >= now]


def _run(rt, who: str, run_id: str):
    row = rt.store.one("SELECT * FROM runs WHERE run_id=?", (run_id,))
    if row is None or row["owner"] != who:
        raise Failure(f"unknown training run {run_id!r}", status=404)
    return row


def run_json(rt, row) -> dict:
    checkpoints = _live_checkpoints(rt, "SELECT * FROM checkpoints WHERE run_id=? ORDER BY created DESC",
                                    (row["run_id"],))
    last = {kind: next((checkpoint_json(c) for c in checkpoints if c["kind"] == kind), None)
            for kind in ("training", "sampler")}
    return {"training_run_id": row["run_id"], "base_model": row["base_model"], "model_owner": row["owner"],
            "is_lora": True, "corrupted": False, "lora_rank": row["rank"], "last_request_time": _iso(row["last_request"]),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"],
            "user_metadata": loads(row["user_metadata"])}


@router.get("/training_runs")
async def list_training_runs(request: Request, limit: Limit = 20, offset: Offset = 0):
    rt, who = runtime(request), owner(request)
    total = rt.store.one("SELECT COUNT(*) AS n FROM runs WHERE owner=?", (who,))["n"]
    rows = rt.store.execute("SELECT * FROM runs WHERE owner=? ORDER BY created DESC LIMIT ? OFFSET ?",
                            (who, limit, offset))
    return {"training_runs": [run_json(rt, r) for r in rows],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, request: Request):
    rt = runtime(request)
    return run_json(rt, _run(rt, owner(request), run_id))


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, request: Request):
    rt = runtime(request)
    _run(rt, owner(request), run_id)
    rows = _live_checkpoints(rt, "SELECT * FROM checkpoints WHERE run_id=? ORDER BY created DESC", (run_id,))
    return {"checkpoints": [checkpoint_json(r) for r in rows], "cursor": None}


@router.get("/checkpoints")
async def list_user_checkpoints(request: Request, limit: Limit = 100, offset: Offset = 0):
    rt, who = runtime(request), owner(request)
    rows = _live_checkpoints(rt, "SELECT * FROM checkpoints WHERE owner=? ORDER BY created DESC", (who,))
    return {"checkpoints": [checkpoint_json(r) for r in rows[offset:offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)}}


def _own_checkpoint(rt, who: str, run_id: str, checkpoint_id: str):
    _run(rt, who, run_id)
    row = rt.store.one("SELECT * FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run_id, checkpoint_id))
    if row is None:
        raise Failure(f"no checkpoint {checkpoint_id!r} in training run {run_id!r}", status=404)
    return row


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
async def publish(run_id: str, checkpoint_id: str, request: Request):
    return _set_public(request, run_id, checkpoint_id, True)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
async def unpublish(run_id: str, checkpoint_id: str, request: Request):
    return _set_public(request, run_id, checkpoint_id, False)


def _set_public(request: Request, run_id: str, checkpoint_id: str, public: bool):
    rt = runtime(request)
    _own_checkpoint(rt, owner(request), run_id, checkpoint_id)
    rt.store.execute("UPDATE checkpoints SET public=? WHERE run_id=? AND checkpoint_id=?",
                     (int(public), run_id, checkpoint_id))
    return {"status": "ok"}


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
async def set_ttl(run_id: str, checkpoint_id: str, data: requests.SetTtl, request: Request):
    rt, who = runtime(request), owner(request)
    _own_checkpoint(rt, who, run_id, checkpoint_id)
    ttl = data.ttl_seconds
    rt.store.execute("UPDATE checkpoints SET expires_at=? WHERE run_id=? AND checkpoint_id=?",
                     (None if ttl is None else time.time() + ttl, run_id, checkpoint_id))
    return {"status": "ok"}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request):
    rt = runtime(request)
    rt.delete_checkpoint(_own_checkpoint(rt, owner(request), run_id, checkpoint_id))
    return {"status": "ok"}


@router.post("/weights_info")
async def weights_info(data: requests.WeightsInfo, request: Request):
    rt, who = runtime(request), owner(request)
    _, folder = rt.checkpoint(who, data.tinker_path)
    meta = operations.read_meta(folder)
    return {"base_model": meta["base_model"], "is_lora": True, "lora_rank": meta["rank"],
            "optimizer_config": {"type": "adamw"},
            **{k: bool(meta.get(k, True)) for k in ("train_attn", "train_mlp", "train_unembed")}}


@router.get("/sessions")
async def list_sessions(request: Request, limit: Limit = 20, offset: Offset = 0):
    rt, who = runtime(request), owner(request)
    rows = rt.store.execute("SELECT session_id FROM sessions WHERE owner=? ORDER BY created DESC LIMIT ? OFFSET ?",
                            (who, limit, offset))
    return {"sessions": [r["session_id"] for r in rows]}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request):
    rt = runtime(request)
    row = rt.session(owner(request), session_id)
    runs = rt.store.execute("SELECT run_id FROM runs WHERE session_id=? ORDER BY created", (session_id,))
    samplers = rt.store.execute("SELECT sampler_id FROM samplers WHERE session_id=? ORDER BY created", (session_id,))
    return {"training_run_ids": [r["run_id"] for r in runs], "sampler_ids": [r["sampler_id"] for r in samplers],
            "user_metadata": loads(row["user_metadata"]), "display_name": None}
