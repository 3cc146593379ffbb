"""The engine's one worker serves every client of a base model, so (issue 18) a call that never returns must be
reported and fail what waits behind it, and a batched request whose loss overflows must fail alone."""

import dataclasses
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jtinker import operations
from jtinker.engine import EngineUnavailable, ModelEngine
from jtinker.losses import NonFiniteError
from jtinker.sft import builtin_arithmetic, conversation_datum
from models.tokenizer import load_tokenizer

MODEL = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def engine():
    engine = ModelEngine(MODEL, num_slots=4, max_rank=4)
    for slot in (1, 2):
        engine.submit(operations.new_adapter, engine, slot, rank=4, seed=slot, train_attn=True, train_mlp=True,
                      train_unembed=True).result()
    return engine


@pytest.fixture(scope="module")
def data():
    tokenizer = load_tokenizer("tiny-chatml")
    return [conversation_datum(tokenizer, c) for c in builtin_arithmetic(2)]


def hold(engine):
    """Occupy the worker until the returned event is set (what a stuck step looks like from outside)."""
    release = threading.Event()
    engine.submit(lambda: release.wait(60))
    return release


def test_a_stalled_call_turns_health_unhealthy_and_fails_what_waits(engine, data):
    engine.stall_seconds = 0.3
    release = hold(engine)
    try:
        waiting = engine.submit_forward_backward(data[:1], 1, "cross_entropy", None, True)
        time.sleep(0.6)
        problem = engine.fail_if_stalled()
        assert problem is not None and "<lambda> call has run for" in problem and "limit 0.3 s" in problem
        with pytest.raises(EngineUnavailable, match="the training engine is not serving: one <lambda> call"):
            waiting.result(timeout=5)
        with pytest.raises(EngineUnavailable):  # new work is refused at once instead of queueing behind it
            engine.submit(lambda: 1).result(timeout=5)
    finally:
        release.set()
        engine.stall_seconds = 600.0
    assert engine.submit(lambda: 7).result(timeout=60) == 7  # the worker took up the queue again
    assert engine.health() is None and not any(g.any() for g in map(np.asarray, engine.trainer.grads.values()))


def test_a_batched_overflowing_request_fails_alone(engine, data, monkeypatch):
    """B's weights of 1e38 (let through as if the bound were missing) batched with A's request: B fails with a
    clear error, A gets the result it gets beside a harmless B, and only A's slot has gradients."""
    overflowing = dataclasses.replace(data[1], loss_fn_inputs={**data[1].loss_fn_inputs,
                                                              "weights": data[1].loss_fn_inputs["weights"] * 1e38})
    monkeypatch.setattr(engine.trainer, "validate", lambda *args: None)

    def batched(second):
        engine.trainer.grads = {p: g * 0 for p, g in engine.trainer.grads.items()}
        batches = engine.stats["batches"]
        release = hold(engine)
        a = engine.submit_forward_backward(data[:1], 1, "cross_entropy", None, True)
        b = engine.submit_forward_backward([second], 2, "cross_entropy", None, True)
        release.set()
        wait = [f.exception(timeout=120) for f in (a, b)]
        assert engine.stats["batches"] == batches + 1  # one shared batch
        grads = engine.submit(lambda: {p: np.asarray(g) for p, g in engine.trainer.grads.items()}).result()
        return a.result(), wait[1], grads

    clean, clean_error, clean_grads = batched(data[1])
    result, error, grads = batched(overflowing)
    assert clean_error is None and isinstance(error, NonFiniteError)
    assert str(error).startswith("non-finite loss or gradient for this request") and "\n" not in str(error)
    assert result.loss == clean.loss and np.isfinite(result.loss)
    np.testing.assert_array_equal(np.concatenate(result.logprobs), np.concatenate(clean.logprobs))
    axes = engine.trainer.slot_axes
    for p, g in grads.items():
        np.testing.assert_array_equal(np.take(g, 1, axes[p]), np.take(clean_grads[p], 1, axes[p]))
        assert not np.take(g, 2, axes[p]).any(), p
    engine.trainer.grads = {p: g * 0 for p, g in engine.trainer.grads.items()}


def test_healthz_is_503_with_the_reason_while_the_engine_is_stalled(tmp_path):
    from jtinker.server.app import create_app
    from jtinker.server.runtime import Runtime

    runtime = Runtime([MODEL], tmp_path, num_slots=2, max_rank=4, stall_seconds=0.3)
    with TestClient(create_app(runtime, extra_routes=[], watchdog_seconds=0.1)) as http:
        assert http.get("/api/v1/healthz").status_code == 200
        release = hold(runtime.engines[MODEL])
        try:
            time.sleep(0.6)
            answer = http.get("/api/v1/healthz")
            assert answer.status_code == 503 and "call has run for" in answer.text and MODEL in answer.text
        finally:
            release.set()
        deadline = time.monotonic() + 60
        while runtime.engines[MODEL].health() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/api/v1/healthz").status_code == 200
