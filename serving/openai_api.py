"""OpenAI-compatible routes: `POST /completions`, `POST /chat/completions`, `GET /models`, under both
`/oai/api/v1` and `/v1`, for the official `openai` client.

This module sits below the platform (`jtinker` imports `serving`, never the other way round), so the server
hands `make_router` a context (the `Context` protocol below) that knows tenants, model names and `tinker://`
checkpoint paths. Requests then go straight to the engine's continuous-batching scheduler: concurrent requests,
also for different adapters, decode in the same batch.

What is served: `model` is a base model name or a `tinker://RUN/sampler_weights/NAME` path the caller's key may
read; `n`, `max_tokens` (chat also `max_completion_tokens`), `temperature` (0 is greedy), `top_p`, `seed`,
`stop` (strings, on top of the end-of-sequence token; the text ends before them), `logprobs` (completions: an
int, the top-N per token; chat: `logprobs: true` and `top_logprobs`), `usage`, and `stream: true` as
server-sent events ending with `data: [DONE]` (streamed chunks carry the chosen tokens' log-probs, not the
top-N alternatives). Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from concurrent.futures import Future
from typing import Any, Protocol

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from models.checks import check_token_ids, first_line
from models.tokenizer import load_tokenizer
from serving.http_limits import check_text_size, limited_route_class, limits_of
from serving.scheduler import Request as SampleRequest
from serving.scheduler import SamplingParams, Scheduler

PREFIXES = ("/oai/api/v1", "/v1")
MAX_STOP = 4


@dataclasses.dataclass(frozen=True)
class SamplerHandle:
    """A resolved model, ready to sample: the engine's continuous-batching scheduler, the adapter slot that holds
    the model's weights (0: the base model), its tokenizer and its end-of-sequence ids."""

    scheduler: Scheduler
    adapter: int
    tokenizer_spec: str | dict
    eos_token_ids: tuple[int, ...]


class Context(Protocol):
    """What the server passes in (`jtinker.server.app.ServerContext` implements it)."""

    def owner(self, api_key: str | None) -> str: ...  # raises an error with `.status == 401` for a bad key

    def models(self) -> list[str]: ...

    def resolve(self, model: str, api_key: str | None) -> Any: ...  # raises an error with `.status`

    def open_sampler(self, target: Any) -> Future: ...  # resolves to a SamplerHandle


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _auth(context: Context, request: Request) -> str | None:
    key = _api_key(request)
    try:
        context.owner(key)
    except Exception as error:
        if getattr(error, "status", None) == 401:
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                           "authentication_error", None, "invalid_api_key") from error
        raise
    return key


async def _json(request: Request) -> dict:
    """The body, read within the server's limits (see `serving.http_limits`): strict JSON, no NaN."""
    try:
        data = await request.json()
    except HTTPException as error:
        raise ApiError(error.status_code, f"We could not read the body of your request: {error.detail}",
                       code="request_too_large" if error.status_code == 413 else "invalid_json") from error
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


# ------------------------------------------------------------------------------------------------ bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server ignores


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, lt=1 << 31)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=128)


class ChatMessage(_Body):
    role: str = Field(max_length=64)
    content: str | list[dict] | None = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=1 << 31)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = Field(None, description="refused (400): this server does not call tools")


def _validated(model: type[BaseModel], data: dict) -> None:
    """Types and ranges of the OpenAI body (a 400 naming the field); the semantics are checked below."""
    from pydantic import ValidationError

    try:
        model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(400, f"'{where}': {first.get('msg', 'invalid')}.", param=where,
                       code="invalid_value") from error


def _body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema()}}}}


# ------------------------------------------------------------------------------------------------ parameters

def _number(data: dict, name: str, default, low=None, high=None, integer=False, low_open=False):
    value = data.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite {'integer' if integer else 'number'}, got {value!r}."[:200],
                       param=name, code="invalid_type")
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value}.", param=name, code="invalid_value")
    return value


def _stop(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them.",
                       param="stop", code="invalid_value")
    return tuple(stop)


@dataclasses.dataclass
class _Plan:
    """One validated request: prompts (token ids) and how to sample them."""

    target: Any
    prompts: list[list[int]]
    n: int
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    top_logprobs: int
    logprobs: bool


def _common(data: dict, *, chat: bool) -> dict:
    n = _number(data, "n", 1, 1, 128, integer=True)
    name = "max_completion_tokens" if chat and data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(data, name, None if chat else 16, 1, integer=True)
    temperature = float(_number(data, "temperature", 1.0, 0, 2))
    top_p = float(_number(data, "top_p", 1.0, 0, 1, low_open=True))
    seed = _number(data, "seed", None, integer=True)
    if chat:
        logprobs = data.get("logprobs") or False
        if not isinstance(logprobs, bool):
            raise ApiError(400, "'logprobs' must be a boolean.", param="logprobs", code="invalid_type")
        top = _number(data, "top_logprobs", 0, 0, 20, integer=True)
        if top and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    else:
        top = _number(data, "logprobs", None, 0, 20, integer=True)
        logprobs, top = top is not None, top or 0
    if data.get("best_of") not in (None, 1, n):
        raise ApiError(400, "'best_of' is not supported.", param="best_of", code="unsupported_parameter")
    if data.get("echo"):
        raise ApiError(400, "'echo' is not supported.", param="echo", code="unsupported_parameter")
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if data.get(name) is not None:
            raise ApiError(400, f"'{name}' is not supported: this server does not call tools.", param=name,
                           code="unsupported_parameter")
    return {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "seed": None if seed is None else seed & 0xFFFFFFFF, "stop": _stop(data), "top_logprobs": top,
                "logprobs": logprobs}


def _prompt_text_size(data: dict, chat: bool) -> int:
    """Characters of text a tokenizer would read (prompt strings, or message contents and names)."""
    if chat:
        messages = data.get("messages")
        total = 0
        for m in messages if isinstance(messages, list) else []:
            for value in (m.values() if isinstance(m, dict) else ()):
                if isinstance(value, str):
                    total += len(value)
                elif isinstance(value, list):
                    total += sum(len(part.get("text", "")) for part in value
                                 if isinstance(part, dict) and isinstance(part.get("text", ""), str))
        return total
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else 0


def _completion_prompts(data: dict, tokenizer) -> list[list[int]]:
    prompt = data.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids.", param="prompt",
                       code="invalid_value")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tokenizer.encode(p, add_special_tokens=False)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids.", param="prompt",
                           code="invalid_value")
        if not ids:
            raise ApiError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
        out.append(ids)
    return out


def _chat_prompt(data: dict, tokenizer) -> list[int]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages", code="invalid_value")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported.",
                                   param=f"messages[{i}].content", code="unsupported_content")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts.",
                           param=f"messages[{i}].content")
        flat.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "This model's tokenizer has no chat template; use /completions.", param="model")
    text = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------ sampling

class _Session:
    """A resolved model: its scheduler, adapter slot and tokenizer."""

    def __init__(self, handle: SamplerHandle):
        self.scheduler = handle.scheduler
        self.adapter = handle.adapter
        self.eos = handle.eos_token_ids
        self.tokenizer = load_tokenizer(handle.tokenizer_spec)

    @property
    def max_len(self) -> int:
        return self.scheduler.engine.max_len

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def request(self, plan: _Plan, prompt: list[int], on_token=None) -> SampleRequest:
        room = self.max_len - len(prompt)
        max_tokens = room if plan.max_tokens is None else plan.max_tokens
        params = SamplingParams(max_tokens=max_tokens, temperature=plan.temperature, top_p=plan.top_p,
                                seed=plan.seed, stop_token_ids=self.eos, stop_strings=plan.stop,
                                top_logprobs=plan.top_logprobs)
        return SampleRequest(list(prompt), params, num_samples=plan.n, adapter=self.adapter, on_token=on_token,
                             decode=self.decode if plan.stop else None)

    def check(self, plan: _Plan) -> None:
        vocab, slots = self.scheduler.engine.vocab_size, self.scheduler.engine.num_slots
        if plan.n > slots:
            raise ApiError(400, f"'n' must be at most {slots} on this server.", param="n", code="invalid_value")
        for prompt in plan.prompts:
            try:
                check_token_ids(prompt, vocab, "prompt")
            except ValueError as error:
                raise ApiError(400, f"{error}.", param="prompt") from error
            if len(prompt) >= self.max_len:
                raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens; your prompt "
                                    f"has {len(prompt)} tokens.", param="prompt",
                               code="context_length_exceeded")
            if plan.max_tokens is not None and len(prompt) + plan.max_tokens > self.max_len:
                raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens; your prompt "
                                    f"has {len(prompt)} tokens and max_tokens is {plan.max_tokens}.",
                               param="max_tokens", code="context_length_exceeded")


def _finish(text: str, stop: tuple[str, ...], reason: str | None) -> tuple[str, str]:
    """The text up to the first stop string, and OpenAI's finish_reason."""
    cut = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cut:
        return text[:min(cut)], "stop"
    return text, "stop" if reason == "stop" else "length"


def _token_text(session: _Session, token: int) -> str:
    """A token's text; a token that is part of a character shows as its byte-level piece instead of U+FFFD."""
    text = session.tokenizer.decode([int(token)])
    if "\ufffd" in text:
        piece = session.tokenizer.convert_ids_to_tokens(int(token))
        text = piece if isinstance(piece, str) else text
    return text


def _top_dict(session: _Session, top) -> dict:
    out: dict[str, float] = {}
    for t, v in top:  # most likely first: keep it where two tokens read the same
        out.setdefault(_token_text(session, t), float(v))
    return out


def _completion_logprobs(session: _Session, sample) -> dict:
    tokens = [_token_text(session, t) for t in sample.tokens]
    offsets, pos = [], 0
    for piece in tokens:
        offsets.append(pos)
        pos += len(piece)
    tops = sample.top_logprobs or [[] for _ in tokens]
    return {"tokens": tokens, "token_logprobs": [float(v) for v in sample.logprobs],
            "top_logprobs": [_top_dict(session, top) for top in tops],
            "text_offset": offsets}


def _chat_logprob(session: _Session, token: int, logprob: float, top=()) -> dict:
    text = _token_text(session, token)
    return {"token": text, "logprob": float(logprob), "bytes": list(text.encode()),
            "top_logprobs": [{"token": (s := _token_text(session, t)), "logprob": float(v), "bytes": list(s.encode())}
                             for t, v in top]}


def _chat_logprobs(session: _Session, sample) -> dict:
    tops = sample.top_logprobs or [[] for _ in sample.tokens]
    return {"content": [_chat_logprob(session, t, v, top) for t, v, top in zip(sample.tokens, sample.logprobs, tops)]}


def _usage(prompts, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _prepare(context: Context, request: Request, chat: bool) -> tuple[_Plan, _Session, dict]:
    key = _auth(context, request)
    data = await _json(request)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a base model name or a tinker:// sampler_weights path.",
                       param="model", code="missing_required_parameter")
    _validated(ChatCompletionRequest if chat else CompletionRequest, data)
    common = _common(data, chat=chat)
    try:
        check_text_size("the prompt", _prompt_text_size(data, chat), limits_of(request).max_prompt_chars,
                        "--max-prompt-chars")
    except HTTPException as error:
        raise ApiError(413, error.detail, param="messages" if chat else "prompt", code="request_too_large") \
            from error
    try:
        target = context.resolve(model, key)
    except Exception as error:
        status = getattr(error, "status", None)
        if status == 401:
            raise ApiError(401, str(error), "authentication_error", None, "invalid_api_key") from error
        if status in (400, 404):
            raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found") from error
        raise
    session = await asyncio.to_thread(_Session, await asyncio.wrap_future(context.open_sampler(target)))
    # Tokenizing a long prompt takes seconds: off the event loop, so other requests (and health) go on.
    prompts = await asyncio.to_thread(
        lambda: [_chat_prompt(data, session.tokenizer)] if chat else _completion_prompts(data, session.tokenizer))
    plan = _Plan(target=target, prompts=prompts, **common)
    session.check(plan)
    return plan, session, data


async def _run(session: _Session, plan: _Plan) -> list:
    """Every prompt's Result, in order (submitted together: they share decode steps)."""
    futures = [session.scheduler.submit(session.request(plan, p)) for p in plan.prompts]
    try:
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    except asyncio.CancelledError:
        for f in futures:
            session.scheduler.cancel(f)
        raise


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _token_events(session: _Session, plan: _Plan):
    """(prompt index, sample index, token, log-prob) as produced, across all prompts; then None per prompt."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    futures = []
    for p, prompt in enumerate(plan.prompts):
        def on_token(i, token, logprob, p=p):
            loop.call_soon_threadsafe(queue.put_nowait, (p, i, token, logprob))

        future = session.scheduler.submit(session.request(plan, prompt, on_token))
        future.add_done_callback(lambda f, p=p: loop.call_soon_threadsafe(queue.put_nowait, (p, None, f, None)))
        futures.append(future)
    open_ = len(futures)
    try:
        while open_:
            item = await queue.get()
            if item[1] is None:
                open_ -= 1
            yield item
    finally:
        for f in futures:
            if not f.done():
                session.scheduler.cancel(f)


class _TextStream:
    """Incremental text of one sample: withholds what might still become a stop string or an incomplete
    character, and stops at the first stop string."""

    def __init__(self, session: _Session, stop: tuple[str, ...]):
        self.session, self.stop, self.tokens, self.sent, self.done = session, stop, [], 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        if self.done:
            return ""
        self.tokens.append(token)
        text = self.session.decode(self.tokens)
        cut = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cut:
            self.done = True
            return self._emit(text[:min(cut)])
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        return self._emit(text[:max(end, self.sent)])

    def flush(self) -> str:
        if self.done:
            return ""
        self.done = True
        return self._emit(self.session.decode(self.tokens))

    def _emit(self, text: str) -> str:
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta


# ------------------------------------------------------------------------------------------------ routes

class _ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: _ErrorInfo


ERROR_RESPONSES = {status: {"model": ErrorBody, "description": what} for status, what in {
    400: "Malformed or out of range (the message names the parameter)", 401: "Missing or unknown API key",
    404: "Unknown model, or one this key may not read", 413: "Over a size limit (the message names its flag)",
    500: "A server error"}.items()}


def _openai_error(request: Request, status: int, message: str) -> JSONResponse:
    return ApiError(status, message, "invalid_request_error" if status < 500 else "server_error").response()


def make_router(context: Context) -> APIRouter:
    routes = APIRouter(route_class=limited_route_class(_openai_error))

    def guarded(handler):
        async def wrapper(request: Request):
            try:
                return await handler(request)
            except ApiError as error:
                return error.response()
            except ValueError as error:  # the scheduler's own validation
                return ApiError(400, first_line(error, "invalid request")).response()
            except Exception as error:  # noqa: BLE001 - an OpenAI-shaped 500, and the server goes on
                status = getattr(error, "status", 500)
                text = first_line(error)
                return ApiError(status if isinstance(status, int) and 400 <= status < 600 else 500, text,
                                "server_error" if status == 500 else "invalid_request_error").response()

        wrapper.__name__ = handler.__name__
        return wrapper

    @routes.get("/models")
    @guarded
    async def list_models(request: Request):
        _auth(context, request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "jtinker"}
                                           for name in context.models()]}

    @routes.post("/completions", openapi_extra=_body_schema(CompletionRequest), responses=ERROR_RESPONSES)
    @guarded
    async def completions(request: Request):
        return await _respond(request, chat=False)

    @routes.post("/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest), responses=ERROR_RESPONSES)
    @guarded
    async def chat_completions(request: Request):
        return await _respond(request, chat=True)

    async def _respond(request: Request, chat: bool):
        """A completion (one choice per prompt and sample) or a chat completion (one prompt), whole or streamed."""
        plan, session, data = await _prepare(context, request, chat=chat)
        ident, created, model = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), data["model"]
        if data.get("stream"):
            return _stream(session, plan, data, ident, created, model, chat=chat)
        results = await _run(session, plan)
        choices, generated = [], 0
        for p, result in enumerate(results):
            for i, sample in enumerate(result.samples):
                text, reason = _finish(session.decode(sample.tokens), plan.stop, sample.stop_reason)
                generated += len(sample.tokens)
                logprobs = None
                if plan.logprobs:
                    logprobs = (_chat_logprobs if chat else _completion_logprobs)(session, sample)
                content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append({"index": p * plan.n + i, **content, "finish_reason": reason, "logprobs": logprobs})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "usage": _usage(plan.prompts, generated)}

    def _stream(session: _Session, plan: _Plan, data: dict, ident: str, created: int, model: str, chat: bool):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None = None, logprob=None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "finish_reason": reason,
                          "logprobs": None if logprob is None else {"content": [logprob]}}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprob}
            body = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return body

        async def events():
            streams = {(p, i): _TextStream(session, plan.stop) for p in range(len(plan.prompts)) for i in range(plan.n)}
            generated = 0
            if chat:
                for i in range(plan.n):
                    first = chunk(i, "")
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield _sse(first)
            try:
                async for p, i, token, logprob in _token_events(session, plan):
                    if i is None:  # prompt p is done: `token` is its future
                        result = token.result()
                        for j, sample in enumerate(result.samples):
                            stream = streams[(p, j)]
                            rest = stream.flush()
                            _, reason = _finish(session.decode(sample.tokens), plan.stop, sample.stop_reason)
                            if rest:
                                yield _sse(chunk(p * plan.n + j, rest))
                            yield _sse(chunk(p * plan.n + j, None if chat else "", reason))
                        continue
                    generated += 1
                    stream = streams[(p, i)]
                    was_done = stream.done
                    delta = stream.push(token)
                    if was_done:
                        continue
                    lp = None
                    if plan.logprobs:
                        if chat:
                            lp = _chat_logprob(session, token, logprob)
                        else:
                            lp = {"tokens": [_token_text(session, token)], "token_logprobs": [float(logprob)],
                                  "top_logprobs": None, "text_offset": [0]}
                    if delta or lp is not None:
                        yield _sse(chunk(p * plan.n + i, delta, None, lp))
                if include_usage:
                    yield _sse({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                                "usage": _usage(plan.prompts, generated)})
            except Exception as error:  # noqa: BLE001 - headers are sent: report in-band
                text = first_line(error)
                yield _sse({"error": {"message": text, "type": "server_error", "param": None, "code": None}})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    router = APIRouter()
    for prefix in PREFIXES:
        router.include_router(routes, prefix=prefix)
    return router
