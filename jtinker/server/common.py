"""What every route needs: the runtime, the caller's tenant, the JSON body, and the future-id answer."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from jtinker.server.runtime import Failure, Runtime, scrub
from models.checks import first_line
from serving.http_limits import check_metadata, limited_route_class, limits_of


class Tenants:
    """API keys -> tenant ids. With no keys configured every caller is the tenant `local`; with keys, an unknown
    key is refused (401) and each key is its own tenant, isolated from the others."""

    def __init__(self, api_keys: list[str] | None):
        self.keys = {key: "key-" + hashlib.sha256(key.encode()).hexdigest()[:16] for key in (api_keys or [])}

    def owner(self, key: str | None) -> str:
        if not self.keys:
            return "local"
        owner = self.keys.get(key or "")
        if owner is None:
            raise Failure("invalid or missing API key (send it as X-API-Key)", status=401)
        return owner

    def from_request(self, request: Request) -> str:
        key = request.headers.get("x-api-key")
        if key is None and request.headers.get("authorization", "").lower().startswith("bearer "):
            key = request.headers["authorization"][7:].strip()
        return self.owner(key)


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def owner(request: Request) -> str:
    return request.app.state.tenants.from_request(request)


async def raw_body(request: Request) -> bytes:
    """The body's bytes, decompressed, within `Limits.max_body_bytes` (see `serving.http_limits`)."""
    return await request.body()


def stored_metadata(request: Request, what: str, value) -> None:
    """Refuse user_metadata / tags over `--max-metadata-kb` before they are stored."""
    check_metadata(what, value, limits_of(request))


def _tinker_error(request: Request, status: int, message: str) -> Response:
    return JSONResponse({"detail": message}, status_code=status,
                        headers={"x-should-retry": "false"} if status >= 500 else None)


def _on_error(request: Request, error: BaseException) -> Response | None:
    """Every error of a Tinker route: a refused request on a training run still settles its place in the run's
    seq_id order (else every later request of the run would wait for it); Failures get their status; anything
    unexpected is a 500 answered here, so the connection stays open."""
    json_body = getattr(request, "_limited_json", None)
    run_request = getattr(request.state, "run_request", None) or (
        (json_body.get("model_id"), json_body.get("seq_id")) if isinstance(json_body, dict) else None)
    if run_request is not None:
        try:
            who = owner(request)
        except Failure:
            who = None
        if who is not None:
            runtime(request).settle_refused(who, *run_request, error)
    if isinstance(error, Failure):
        return _tinker_error(request, error.status, scrub(first_line(error, ""), runtime(request).state_dir))
    if isinstance(error, (RequestValidationError, HTTPException)):
        return None  # shaped by the route class
    text = scrub(first_line(error, ""), runtime(request).state_dir)
    return _tinker_error(request, 500, f"{type(error).__name__}: {text}" if text else type(error).__name__)


TinkerRoute = limited_route_class(_tinker_error, _on_error)


def tinker_router() -> APIRouter:
    """The /api/v1 router of one Tinker route module, with the limits and error shapes of `TinkerRoute`."""
    return APIRouter(prefix="/api/v1", route_class=TinkerRoute, responses=ERROR_RESPONSES)


class ErrorDetail(BaseModel):
    detail: str


ERROR_RESPONSES = {status: {"model": ErrorDetail, "description": what} for status, what in {
    400: "The request is malformed or a value is out of range (the message names the field)",
    401: "Missing or unknown API key", 404: "No such object for this API key, or not implemented by this server",
    410: "The training run is no longer loaded", 413: "Over a size limit (the message names the limit's flag)",
    415: "Unsupported content-encoding", 500: "A server error (reported with x-should-retry: false)",
    503: "The server is not serving (health says why)"}.items()}


def future(request_id: str, **extra) -> dict:
    """The UntypedAPIFuture answer of every future-returning endpoint."""
    return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}
