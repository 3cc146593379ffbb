"""What every route needs: the runtime, the caller's tenant, the JSON body, and the future-id answer."""

from __future__ import annotations

import hashlib
import json

from fastapi import Request

from jtinker.server.runtime import Failure, Runtime


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


async def body(request: Request) -> dict:
    raw = await raw_body(request)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise Failure(f"the request body is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise Failure("the request body must be a JSON object")
    return value


async def raw_body(request: Request) -> bytes:
    raw = await request.body()
    if request.headers.get("content-encoding", "").lower() == "zstd":
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 31)
    return raw


def require(data: dict, *names: str):
    missing = [n for n in names if data.get(n) is None]
    if missing:
        raise Failure(f"missing field(s): {', '.join(missing)}")
    return [data[n] for n in names]


def future(request_id: str, **extra) -> dict:
    """The UntypedAPIFuture answer of every future-returning endpoint."""
    return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}
