"""The ASGI app of `jtinker serve`: the Tinker REST API under /api/v1, plus mount points for other routers.

`create_app(runtime, api_keys, extra_routes)` builds it. Each `extra_routes` entry is a factory
`ServerContext -> fastapi.APIRouter`; that is how the OpenAI-compatible routes of `serving/` plug in without
importing this package: the context hands them `resolve(model, api_key)` (a base model name or a `tinker://`
checkpoint path -> `Target`), `open_sampler(target)` (-> `serving.openai_api.SamplerHandle`) and
`sample(target, tokens, ...)`, and they mount wherever they like (by the design, /oai/api/v1 and /v1).
`serve` passes `serving.openai_api.make_router`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from jtinker import operations
from jtinker.server import routes_rest, routes_sampling, routes_session, routes_training
from jtinker.server.common import Tenants, tinker_router
from jtinker.server.runtime import Failure, Runtime
from models.checks import first_line
from serving import openai_api
from serving.http_limits import Limits


@dataclasses.dataclass(frozen=True)
class Target:
    """What a model name resolves to: a served base model and, for a checkpoint path, the adapter's source (a
    checkpoint folder) that `ServerContext.sample` loads into a slot."""

    base_model: str
    adapter: str | None = None
    path: str | None = None


@dataclasses.dataclass
class ServerContext:
    runtime: Runtime
    tenants: Tenants

    def owner(self, api_key: str | None) -> str:
        """The tenant of an API key; raises `Failure` (status 401) for an unknown key."""
        return self.tenants.owner(api_key)

    def models(self) -> list[str]:
        return list(self.runtime.engines)

    def resolve(self, model: str, api_key: str | None) -> Target:
        """A served base model name, or a `tinker://RUN/sampler_weights|weights/NAME` path this key may read
        (its own or a published one). Raises `Failure` (404 for a path it may not read)."""
        owner = self.owner(api_key)
        if model.startswith("tinker://"):
            _, folder = self.runtime.checkpoint(owner, model)
            base = operations.read_meta(folder)["base_model"]
            return Target(self.runtime.engine(base).base_model, str(folder), model)
        return Target(self.runtime.engine(model).base_model)

    def sample(self, target: Target, tokens: list[int], num_samples: int = 1, **params) -> concurrent.futures.Future:
        """Sample on the target's engine worker; resolves to ([(tokens, logprobs, stop_reason)], prompt_logprobs).
        `params` are `operations.sample`'s (max_tokens, temperature, top_k, top_p, seed, stop, ...)."""
        runtime = self.runtime
        engine = runtime.engine(target.base_model)

        def run():
            return operations.sample(engine, runtime.sampler_slot(engine, target.adapter), tokens, num_samples,
                                     **params)

        return engine.submit(run)

    def open_sampler(self, target: Target) -> concurrent.futures.Future:
        """For serving many requests at once (OpenAI routes): on the engine worker, load the target's adapter
        into a slot and hand the sampler the live weights; resolves to a `serving.openai_api.SamplerHandle`.
        Requests then go to the scheduler directly, so concurrent requests, whatever their adapters, share
        decode steps instead of queuing one by one behind the worker."""
        runtime = self.runtime
        engine = runtime.engine(target.base_model)

        def run() -> openai_api.SamplerHandle:
            slot = runtime.sampler_slot(engine, target.adapter)
            sampler = engine.sampler
            sampler.refresh()
            eos = engine.model.config.eos_token_id
            eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
            return openai_api.SamplerHandle(sampler.scheduler, slot, engine.tokenizer_spec, tuple(int(e) for e in eos))

        return engine.submit(run)


class _Guard:
    """The outermost ASGI layer: an exception that escaped every handler becomes a JSON 500 here (if nothing was
    sent yet) instead of propagating to uvicorn, which would also drop the client's keep-alive connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - answered, and the server goes on
            if started:
                return
            text = first_line(error, "")
            await JSONResponse({"detail": f"{type(error).__name__}: {text}"}, status_code=500,
                               headers={"x-should-retry": "false"})(scope, receive, send)


_not_implemented = tinker_router()


@_not_implemented.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                            include_in_schema=False)
async def not_implemented(path: str, request: Request):
    """Any other /api/v1 endpoint: a Tinker-shaped 404 (the SDK does not retry it), read far enough that a
    request on a training run still settles its place in the run's order (see `Runtime.settle_refused`)."""
    with contextlib.suppress(Exception):
        await request.json()
    raise Failure(f"{request.method} /api/v1/{path} is not implemented by this server", status=404)


def create_app(runtime: Runtime, api_keys: list[str] | None = None, extra_routes=(),
               limits: Limits | None = None, watchdog_seconds: float = 1.0) -> FastAPI:
    tenants = Tenants(api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.loop = asyncio.get_running_loop()

        async def upkeep():
            while True:
                await asyncio.sleep(10)
                await asyncio.to_thread(runtime.upkeep)

        async def watchdog():  # a stalled engine or sampler fails what waits on it, and health says why
            while True:
                await asyncio.sleep(watchdog_seconds)
                runtime.health()

        tasks = [asyncio.create_task(upkeep()), asyncio.create_task(watchdog())]
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="jtinker", lifespan=lifespan, description=(
        "The Tinker REST API (under /api/v1) and OpenAI-compatible routes (under /v1 and /oai/api/v1). Every "
        "client error is a 4xx with a one-line message; limits are set by `jtinker serve` flags."))
    app.state.runtime, app.state.tenants = runtime, tenants
    app.state.limits = limits or Limits()
    app.state.context = ServerContext(runtime, tenants)
    app.state.client_config = dict(routes_session.CLIENT_CONFIG)

    @app.exception_handler(Failure)
    async def failure(request: Request, error: Failure):
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    for module in (routes_session, routes_training, routes_sampling, routes_rest):
        app.include_router(module.router)
    for factory in extra_routes:
        app.include_router(factory(app.state.context))
    app.include_router(_not_implemented)
    app.add_middleware(_Guard)
    return app


def serve(models: list[str], host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None,
          state_dir: str | Path = "jtinker-state", num_slots: int = 33, max_rank: int = 32,
          poll_seconds: float = 25.0, session_timeout: float = 180.0, fwdbwd_max_chunk_len: int = 1024,
          limits: Limits | None = None, stall_seconds: float = 600.0) -> None:
    """Run the server until SIGINT/SIGTERM (what `jtinker serve` does). Shutdown waits at most 3 s for open
    requests (long polls and streams fail; their futures stay in the store for `retrieve_future`)."""
    import uvicorn

    runtime = Runtime(models, Path(state_dir), num_slots=num_slots, max_rank=max_rank, poll_seconds=poll_seconds,
                      session_timeout=session_timeout, stall_seconds=stall_seconds)
    app = create_app(runtime, api_keys, extra_routes=[openai_api.make_router], limits=limits)
    app.state.client_config = {**routes_session.CLIENT_CONFIG, "fwdbwd_max_chunk_len": fwdbwd_max_chunk_len}
    print(json.dumps({"event": "listening", "url": f"http://{host}:{port}", "models": list(runtime.engines),
                      "state_dir": str(runtime.state_dir), "interrupted_requests_failed": runtime.interrupted,
                      "recovered": runtime.recovered, "auth": "api-keys" if api_keys else "none"}), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=75, timeout_graceful_shutdown=3)
