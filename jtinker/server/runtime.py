"""The server's core: base-model engines, live training runs (one adapter slot each), sampler slots, futures.

Why it looks like this:
- Each request that returns a future is recorded (pending) before its request id is answered, and its result is
  stored before any waiter wakes, so `retrieve_future` can always answer from the store, also after a restart.
- Per training run, requests run in `seq_id` order: the SDK sends one forward_backward's chunks concurrently
  (the first chunk last), so a request waits until every lower `seq_id` was handed to the engine. Chunks then
  simply accumulate gradients until `optim_step`. A retried POST (same run and seq_id) gets the same future.
- Training runs hold their slot until their session ends (finish, or heartbeats stop). Samplers hold none:
  their adapter is loaded into a slot on use and cached, least recently used first out, so an RL loop that
  makes a new sampler every step never runs out of slots.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import threading
import time
import uuid
from pathlib import Path

from jtinker import operations
from jtinker.engine import ModelEngine, SlotsExhausted
from jtinker.server import wire
from jtinker.server.store import Store, dumps
from models.checks import first_line


class Failure(Exception):
    """An error for the client: reported as `{"error", "category"}` through a future, or as HTTP `status`."""

    def __init__(self, message: str, category: str = "user", status: int = 400):
        super().__init__(message)
        self.category, self.status = category, status


def scrub(text: str, state_dir: Path | None) -> str:
    """A message without the server's own filesystem paths (they are no business of a client)."""
    return text if state_dir is None else text.replace(str(state_dir) + "/", "").replace(str(state_dir), "<state>")


def error_body(error: BaseException, state_dir: Path | None = None) -> bytes:
    if isinstance(error, Failure):
        category = error.category
    elif isinstance(error, (ValueError, FileNotFoundError, KeyError, SlotsExhausted, PermissionError)):
        category = "user"
    else:
        category = "server"
    text = scrub(first_line(error), state_dir)
    if category == "server" and not isinstance(error, Failure):
        text = f"{type(error).__name__}: {text}"
    return json.dumps({"error": text, "category": category}).encode()


@dataclasses.dataclass
class Result:
    body: bytes
    content_type: str = wire.JSON
    extra_sql: tuple = ()
    after_commit: object = None  # called once the result is stored (e.g. remove an overwritten checkpoint)


def json_result(value: dict, extra_sql=()) -> Result:
    return Result(json.dumps(value).encode(), wire.JSON, tuple(extra_sql))


class _Lease:
    """Holds an adapter slot: the engine frees the slot when its holder is collected, so dropping the last
    reference to a `_Lease` is how a slot is given back (never `release_slot`, which a late finalizer could
    repeat after the slot has a new holder)."""


@dataclasses.dataclass(eq=False)
class LiveModel:
    model_id: str
    owner: str
    session_id: str
    engine: ModelEngine
    rank: int
    lora: dict
    slot: int | None = None
    holder: _Lease | None = None
    next_seq: int = 1
    closed: bool = False
    pending: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class Runtime:
    def __init__(self, models: list[str], state_dir: Path, *, num_slots: int = 33, max_rank: int = 32,
                 poll_seconds: float = 25.0, session_timeout: float = 180.0, stall_seconds: float = 600.0):
        if not models:
            raise ValueError("serve needs at least one --model")
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "jtinker.sqlite")
        self.interrupted = self.store.fail_interrupted()
        self.recovered = self._recover_saves()
        self.poll_seconds, self.session_timeout, self.stall_seconds = poll_seconds, session_timeout, stall_seconds
        self.engines: dict[str, ModelEngine] = {}
        for spec in models:
            self.engines[spec] = ModelEngine(spec, num_slots, max_rank, stall_seconds=stall_seconds)
        self.models: dict[str, LiveModel] = {}
        self._sampler_cache: dict[str, collections.OrderedDict] = {name: collections.OrderedDict()
                                                                   for name in self.engines}
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def _recover_saves(self) -> dict:
        """Finish or undo the saves a crash interrupted (see `operations.recover_checkpoints`): an overwrite
        stands only if its result was committed with its save id; temporary sampler snapshots go."""
        def committed(run: str, kind: str, name: str) -> str | None:
            row = self.store.one("SELECT save_id FROM checkpoints WHERE run_id=? AND checkpoint_id=?",
                                 (run, f"{kind}/{name}"))
            return None if row is None else row["save_id"] or ""

        counts = operations.recover_checkpoints(self.state_dir, committed)
        samplers = self.state_dir / "_samplers"
        counts["snapshot_tmp_removed"] = 0
        for tmp in samplers.glob("*.tmp.npz") if samplers.is_dir() else []:
            tmp.unlink(missing_ok=True)
            counts["snapshot_tmp_removed"] += 1
        return {k: v for k, v in counts.items() if v}

    # ------------------------------------------------------------------------------------------------ lookup

    def engine(self, base_model: str | None) -> ModelEngine:
        if base_model in self.engines:
            return self.engines[base_model]
        if base_model and Path(base_model).is_dir():
            for name, engine in self.engines.items():
                if Path(name).is_dir() and Path(name).resolve() == Path(base_model).resolve():
                    return engine
        raise Failure(f"unknown base model {base_model!r}; this server serves: {', '.join(self.engines)}")

    def session(self, owner: str, session_id: str):
        row = self.store.one("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        if row is None or row["owner"] != owner:
            raise Failure(f"unknown session {session_id!r}", status=404)
        return row

    def live_model(self, owner: str, model_id: str) -> LiveModel:
        model = self.models.get(model_id)
        if model is not None and model.owner == owner and not model.closed:
            return model
        row = self.store.one("SELECT owner FROM runs WHERE run_id=?", (model_id,))
        if row is None or row["owner"] != owner:
            raise Failure(f"unknown model_id {model_id!r}", status=404)
        raise Failure(f"training run {model_id!r} is not loaded (its session ended or the server restarted): "
                      "create a training client from its last saved state", category="user", status=410)

    def run_or_failed(self, owner: str, model_id: str, kind: str):
        """(live run, None), or (None, the id of a future failed with why) for an owned run that is not loaded
        (after a restart, or its session ended): the POST still succeeds, so the SDK's per-client request
        sequence stays intact and every later request fails the same clear way instead of stalling."""
        try:
            return self.live_model(owner, model_id), None
        except Failure as error:
            if error.status != 410:
                raise
            request_id, _ = self.new_future(owner, kind)
            self.fail(request_id, error)
            return None, request_id

    def checkpoint(self, owner: str, path: str, kinds=operations.KINDS) -> tuple:
        """(row, folder) of a checkpoint this owner may read: its own, or a published one."""
        try:
            run, kind, name = operations.parse_tinker_path(path, kinds)
        except ValueError as error:
            raise Failure(str(error)) from error
        row = self.store.one("SELECT * FROM checkpoints WHERE run_id=? AND checkpoint_id=?", (run, f"{kind}/{name}"))
        if row is None and owner == "local":
            # Without API keys the server is single-tenant: it also serves checkpoints that the in-process API
            # wrote into the same state directory (e.g. the quickstart's), which have no row of their own.
            row = {"owner": "local", "public": False, "expires_at": None}
        expired = row is not None and row["expires_at"] is not None and row["expires_at"] < time.time()
        if row is None or expired or (row["owner"] != owner and not row["public"]):
            raise Failure(f"no checkpoint at {path}", status=404)
        folder = (self.state_dir / run / kind / name).resolve()
        if self.state_dir not in folder.parents or not (folder / "meta.json").is_file():
            raise Failure(f"no checkpoint at {path}", status=404)
        return row, folder

    # ------------------------------------------------------------------------------------------------ futures

    def new_future(self, owner: str, kind: str, dedupe: str | None = None) -> tuple[str, bool]:
        """(request_id, is_new): a retried request (same `dedupe`) gets its first request id back."""
        request_id = f"{kind}-{uuid.uuid4().hex}"
        existing = self.store.add_future(request_id, owner, kind, dedupe)
        return (existing, False) if existing else (request_id, True)

    def fail(self, request_id: str, error: BaseException) -> None:
        self.store.finish_future(request_id, "failed", wire.JSON, error_body(error, self.state_dir))
        self._notify(request_id)

    def attach(self, request_id: str, future, convert=lambda r: r) -> None:
        """When the engine's `future` resolves, store `convert(result)` (a Result) or the error, then wake
        waiters. Runs on the engine's worker, right after the work."""

        def done(f):
            try:
                result = convert(f.result())
                self.store.finish_future(request_id, "done", result.content_type, result.body, result.extra_sql)
            except BaseException as error:  # noqa: BLE001 - every failure goes to the client
                self.store.finish_future(request_id, "failed", wire.JSON, error_body(error, self.state_dir))
            else:
                if result.after_commit is not None:
                    result.after_commit()
            self._notify(request_id)

        future.add_done_callback(done)

    def run(self, owner: str, kind: str, engine: ModelEngine, fn, *, dedupe: str | None = None) -> str:
        """A future for `fn()` (returning a Result) run on `engine`'s worker."""
        request_id, new = self.new_future(owner, kind, dedupe)
        if new:
            self.attach(request_id, engine.submit(fn))
        return request_id

    def ordered(self, model: LiveModel, kind: str, seq_id: int | None, start) -> str:
        """A future for a training run's request, started (`start() -> (concurrent future, convert)`) once every
        lower seq_id of the run was started."""
        seq_id = seq_id or None  # absent (JSON) or 0 (protobuf default): next in line
        dedupe = None if seq_id is None else f"{model.model_id}#{seq_id}"
        request_id, new = self.new_future(model.owner, kind, dedupe)
        if not new:
            return request_id
        with model.lock:
            if seq_id is None:
                seq_id = max([model.next_seq - 1, *model.pending]) + 1
            if seq_id < model.next_seq or seq_id in model.pending:
                self.fail(request_id, Failure(f"seq_id {seq_id} of {model.model_id} was already used"))
                return request_id
            model.pending[seq_id] = (request_id, start)
            while model.next_seq in model.pending:
                rid, begin = model.pending.pop(model.next_seq)
                model.next_seq += 1
                if model.closed:
                    self.fail(rid, Failure(f"training run {model.model_id!r} was closed"))
                    continue
                try:
                    future, convert = begin()
                except BaseException as error:  # noqa: BLE001
                    self.fail(rid, error)
                    continue
                self.attach(rid, future, convert)
        return request_id

    def settle_refused(self, owner: str, model_id, seq_id, error: BaseException) -> None:
        """A request on a training run that was refused before it was queued (a bad body, an endpoint this
        server does not implement) still fills its seq_id in the run's order, as a failed future: the SDK
        numbers a client's requests before sending them, so an unfilled number would hold back every later
        request of the run (load_state after a refused save_weights_external waited forever)."""
        if not isinstance(model_id, str) or isinstance(seq_id, bool) or not isinstance(seq_id, int) or \
                not 0 < seq_id < 1 << 63:
            return
        model = self.models.get(model_id)
        if model is None or model.owner != owner or model.closed:
            return

        def refused():
            raise Failure(f"refused: {first_line(error)}")

        self.ordered(model, "refused", seq_id, refused)

    def _notify(self, request_id: str) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, request_id)

    def _wake(self, request_id: str) -> None:
        for waiter in self._waiters.pop(request_id, []):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, request_id: str, timeout: float):
        """The future's row once it is done, or still pending after `timeout` seconds (long poll)."""
        row = self.store.future(request_id)
        if row is None or row["status"] != "pending" or timeout <= 0:
            return row
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(waiter)
        row = self.store.future(request_id)  # it may have finished before the waiter was registered
        if row["status"] == "pending":
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(request_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
            row = self.store.future(request_id)
        return row

    # -------------------------------------------------------------------------------------- slots (worker only)

    def lease(self, engine: ModelEngine, holder) -> int:
        """A slot for `holder`; evicts the least recently used sampler adapter when none is free."""
        cache = self._sampler_cache[engine.base_model]
        while True:
            try:
                return engine.lease_slot(holder)
            except SlotsExhausted:
                if not cache:
                    raise
                evicted = cache.popitem(last=False)
                del evicted  # its _Lease goes, and with it the slot

    def sampler_slot(self, engine: ModelEngine, source: str) -> int:
        """The slot holding the sampler adapter at `source` (a checkpoint folder or a snapshot file)."""
        if not source:
            return 0
        cache = self._sampler_cache[engine.base_model]
        if source in cache:
            cache.move_to_end(source)
            return cache[source][0]
        lease = _Lease()
        slot = self.lease(engine, lease)
        try:
            if source.endswith(".npz"):
                operations.load_snapshot(engine, slot, Path(source))
            else:
                operations.load_checkpoint(engine, slot, Path(source), with_optimizer=False)
        except BaseException:
            del lease
            raise
        cache[source] = (slot, lease)
        return slot

    def forget_sampler(self, engine: ModelEngine, source: str) -> None:
        self._sampler_cache[engine.base_model].pop(str(source), None)

    def release(self, model: LiveModel) -> None:
        """Close a training run: later requests fail; its slot returns after the work already queued."""
        model.closed = True
        self.models.pop(model.model_id, None)
        model.engine.submit(setattr, model, "holder", None)

    def end_session(self, session_id: str) -> None:
        """Close the session's training runs and delete its ephemeral sampler snapshots (named checkpoints stay)."""
        for model in [m for m in self.models.values() if m.session_id == session_id]:
            self.release(model)
        for row in self.store.execute("SELECT * FROM samplers WHERE session_id=? AND source LIKE '%.npz'",
                                      (session_id,)):
            self.store.execute("DELETE FROM samplers WHERE sampler_id=?", (row["sampler_id"],))
            engine = self.engines.get(row["base_model"])
            if engine is not None:
                engine.submit(self._drop_snapshot, engine, row["source"])

    def _drop_snapshot(self, engine: ModelEngine, source: str) -> None:
        self.forget_sampler(engine, source)
        file = Path(source)
        if self.state_dir in file.resolve().parents:
            file.unlink(missing_ok=True)

    # -------------------------------------------------------------------------------------------- health

    def health(self) -> list[str]:
        """Why the server is not serving, one line per stalled or dead engine worker or sampler; [] when well.
        Checking also fails what waits on a stalled one (the watchdog calls this every second)."""
        return [f"{name}: {problem}" for name, engine in self.engines.items()
                if (problem := engine.fail_if_stalled()) is not None]

    # -------------------------------------------------------------------------------------------- upkeep

    def upkeep(self) -> None:
        """Close runs of sessions whose heartbeats stopped; delete expired checkpoints."""
        now = time.time()
        stale = self.store.execute("SELECT session_id FROM sessions WHERE finished=0 AND heartbeat<?",
                                   (now - self.session_timeout,))
        for row in stale:
            self.store.execute("UPDATE sessions SET finished=1 WHERE session_id=?", (row["session_id"],))
            self.end_session(row["session_id"])
        for row in self.store.execute("SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at<?",
                                      (now,)):
            self.delete_checkpoint(row)

    def delete_checkpoint(self, row) -> None:
        folder = (self.state_dir / row["run_id"] / row["checkpoint_id"]).resolve()
        self.store.execute("DELETE FROM checkpoints WHERE run_id=? AND checkpoint_id=?",
                           (row["run_id"], row["checkpoint_id"]))
        if self.state_dir in folder.parents:
            meta = folder / "meta.json"
            base = operations.read_meta(folder).get("base_model") if meta.is_file() else None
            operations.remove_tree(folder)
            if base in self.engines:
                engine = self.engines[base]
                engine.submit(self.forget_sampler, engine, str(folder))

    def add_run(self, model: LiveModel, user_metadata) -> tuple:
        now = time.time()
        return ("INSERT OR REPLACE INTO runs (run_id, owner, session_id, base_model, rank, lora, created, "
                "last_request, user_metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model.model_id, model.owner, model.session_id, model.engine.base_model, model.rank,
                 json.dumps(model.lora), now, now, dumps(user_metadata)))
