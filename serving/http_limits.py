"""Request bodies that cannot exhaust or wedge the server: size limits, bounded decompression, strict JSON.

Every route of `jtinker serve` (the Tinker API above `serving/` and the OpenAI routes here) reads its body
through `LimitedRequest`, which the route classes made by `limited_route_class` install:
- the body, and again its zstd-decompressed form, may not exceed `Limits.max_body_bytes` (decompression stops
  there: an 8 KB "zip bomb" cannot allocate 256 MiB);
- JSON is strict: no NaN/Infinity constants, no lone surrogates (they break tokenizers and UTF-8 output), no
  nesting beyond `max_json_depth`; a large body is parsed in a worker thread, so health checks still answer.
A broken limit is a 413 whose message names the limit and the `jtinker serve` flag that sets it; a malformed
body is a 400. How the error is shaped (Tinker's `{"detail"}` or OpenAI's `{"error": {...}}`) is the route
family's choice, passed in as `error_response`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

_THREAD_PARSE_BYTES = 1 << 20  # bodies above this are parsed off the event loop


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may send. Each has a `jtinker serve` flag (named in the 413 it causes)."""

    max_body_bytes: int = 64 << 20  # --max-body-mb: raw, and again after decompression
    max_metadata_bytes: int = 64 << 10  # --max-metadata-kb: user_metadata / tags stored per session, run, checkpoint
    max_prompt_chars: int = 1 << 20  # --max-prompt-chars: checked before any tokenizer runs
    max_json_depth: int = 64


class TooLarge(HTTPException):
    """A request over one of the `Limits` (413)."""

    def __init__(self, what: str, size: int, limit: int, flag: str, unit: str = "bytes"):
        super().__init__(413, f"{what} is {size:,} {unit}, over this server's limit of {limit:,} "
                              f"(jtinker serve {flag})")


class BadBody(HTTPException):
    """A body that cannot be read (400)."""

    def __init__(self, message: str):
        super().__init__(400, message)


def limits_of(request: Request) -> Limits:
    return getattr(request.app.state, "limits", None) or Limits()


def check_text_size(what: str, characters: int, limit: int, flag: str) -> None:
    """Refuse text of more than `limit` characters before anything expensive (a tokenizer) reads it."""
    if characters > limit:
        raise TooLarge(what, characters, limit, flag, unit="characters")


def check_metadata(what: str, value, limits: Limits) -> None:
    """Refuse stored metadata (user_metadata, tags) whose JSON form is over `max_metadata_bytes`."""
    if value is None:
        return
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > limits.max_metadata_bytes:
        raise TooLarge(what, size, limits.max_metadata_bytes, "--max-metadata-kb")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (send finite numbers)")


def check_json_value(value, max_depth: int) -> None:
    """Walk a parsed JSON value (iteratively: depth cannot recurse the checker): nesting depth, and strings that
    are valid Unicode (a lone surrogate `\\ud800` is valid JSON but not text)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(f"JSON nested deeper than {max_depth} levels")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError("a string holds a lone surrogate (invalid Unicode)") from error
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:32]} overflows a float (send finite numbers)")
    return value


def parse_json(raw: bytes | str, max_depth: int = Limits.max_json_depth):
    """Strict JSON (see the module docstring); a one-line ValueError for anything else."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError as error:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"the body is not UTF-8: {error.reason} at byte {error.start}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"the body is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from error
    check_json_value(value, max_depth)
    return value


def _decompress_zstd(raw: bytes, limit: int) -> bytes:
    """Decompress in 1 MiB reads, stopping once past `limit`: output never grows beyond limit + 1 MiB."""
    import io

    import zstandard

    parts, size = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True) as reader:
            while piece := reader.read(1 << 20):
                size += len(piece)
                if size > limit:
                    raise TooLarge("the decompressed body", size, limit, "--max-body-mb")
                parts.append(piece)
    except zstandard.ZstdError as error:
        raise BadBody(f"the body is not valid zstd: {error}") from error
    return b"".join(parts)


class LimitedRequest(Request):
    """A Request whose `body()` and `json()` keep to the app's `Limits` (see the module docstring)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_limited_body"):
            limit = limits_of(self).max_body_bytes
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise TooLarge("the request body", int(declared), limit, "--max-body-mb")
            parts, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge("the request body", size, limit, "--max-body-mb")
                parts.append(chunk)
            raw = b"".join(parts)
            encoding = self.headers.get("content-encoding", "").strip().lower()
            if encoding == "zstd":
                raw = await asyncio.to_thread(_decompress_zstd, raw, limit)
            elif encoding not in ("", "identity"):
                raise HTTPException(415, f"content-encoding {encoding!r} is not supported (send zstd or none)")
            self._limited_body = raw
        return self._limited_body

    async def json(self):
        if not hasattr(self, "_limited_json"):
            raw = await self.body()
            depth = limits_of(self).max_json_depth
            try:
                if len(raw) > _THREAD_PARSE_BYTES:
                    self._limited_json = await asyncio.to_thread(parse_json, raw, depth)
                else:
                    self._limited_json = parse_json(raw, depth)
            except ValueError as error:
                raise BadBody(str(error)) from error
        return self._limited_json


def describe_validation(error: RequestValidationError) -> str:
    """Pydantic's errors as one line: `field.path: message; ...` (at most three), no input echoed back."""
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def limited_route_class(error_response: Callable[[Request, int, str], Response],
                        on_error: Callable[[Request, BaseException], Response | None] | None = None) -> type:
    """An APIRoute class whose requests are `LimitedRequest`s, and whose validation, limit and body errors
    become `error_response(request, status, one-line message)`. `on_error(request, error)` sees every error
    first (e.g. to settle a refused request's place in a run's order) and may answer itself."""

    class LimitedRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                request = LimitedRequest(request.scope, request.receive)
                try:
                    return await handler(request)
                except Exception as error:  # noqa: BLE001 - every failure gets an answer of the family's shape
                    if on_error is not None:
                        answer = on_error(request, error)
                        if answer is not None:
                            return answer
                    if isinstance(error, RequestValidationError):
                        return error_response(request, 400, describe_validation(error))
                    if isinstance(error, HTTPException):
                        return error_response(request, error.status_code, str(error.detail))
                    raise

            return run

    return LimitedRoute
