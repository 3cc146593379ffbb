"""Issue 18, as a hostile or unlucky user meets it: `jtinker serve` with two API keys, over real loopback HTTP
(the official SDK where it can send the request, raw HTTP where it cannot). Each test is one finding: the
request that used to wedge, corrupt or crash something, and what must happen now. A bounded schema-driven
fuzzer over /openapi.json closes the module; the last tests SIGKILL and SIGTERM the server.
"""

import http.client
import json
import random
import threading
import time

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
httpx = pytest.importorskip("httpx")
from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402

ALICE, BOB = "tml-alice-h", "tml-bob-h"
MODEL = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def server(tmp_path_factory, jax_cache_dir, jtinker_server):
    srv = jtinker_server([MODEL], tmp_path_factory.mktemp("hardening-state"),
                         tmp_path_factory.mktemp("hardening-log") / "server.log", api_keys=(ALICE, BOB),
                         jax_cache=jax_cache_dir, extra_args=("--poll-seconds", "5", "--slots", "12",
                                                              "--max-lora-rank", "8"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server):
    return httpx.Client(base_url=server.url, headers={"X-API-Key": ALICE}, timeout=120)


@pytest.fixture(scope="module")
def bob(server):
    return httpx.Client(base_url=server.url, headers={"X-API-Key": BOB}, timeout=120)


def result(client, answer: httpx.Response, timeout: float = 120) -> dict:
    """The settled result of a future-returning request (retrieve_future until it is not try_again)."""
    assert answer.status_code == 200, answer.text
    request_id, deadline = answer.json()["request_id"], time.time() + timeout
    while time.time() < deadline:
        out = client.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert out.status_code == 200, out.text
        body = out.json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError(f"future {request_id} did not settle in {timeout}s")


def new_run(client, rank: int = 4, seed: int = 0) -> str:
    """A training run made with raw requests, so a test controls its seq_ids: its model_id."""
    session = client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "test"}).json()["session_id"]
    made = client.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": MODEL,
                                                     "lora_config": {"rank": rank, "seed": seed}})
    assert "error" not in result(client, made)
    return made.json()["model_id"]


def datum(tokens, weight: float = 1.0) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [weight] * (len(tokens) - 1)})


DATA = [datum([5, 17, 33, 2, 9, 41, 7, 12]), datum([3, 8, 21, 60, 4, 11, 19, 30])]


def test_bad_seeds_no_longer_wedge_sampling_for_every_tenant(server, alice):
    """Finding 1: seed 2**63 raised inside the scheduler after taking slots; 16 of them hung every tenant."""
    sampler = server.sdk_client(BOB).create_sampling_client(base_model=MODEL).result()
    prompt = types.ModelInput.from_ints([5, 17, 33, 2])
    body = {"base_model": MODEL, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 17, 33, 2]}]},
            "num_samples": 1, "sampling_params": {"max_tokens": 4}}
    for seed in (1208925819614629174706176, 2**64, 1.5, "7"):
        refused = alice.post("/api/v1/asample", json={**body, "sampling_params": {"max_tokens": 4, "seed": seed}})
        assert refused.status_code == 400 and "seed" in refused.json()["detail"]
    for _ in range(16):  # seeds in [2**63, 2**64) are valid now: each has its own stream
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, seed=2**63)).result(timeout=120)
    wide = sampler.sample(prompt, 16, types.SamplingParams(max_tokens=4, seed=2**64 - 1)).result(timeout=120)
    assert len(wide.sequences) == 16
    other = server.sdk_client(ALICE).create_sampling_client(base_model=MODEL).result()
    assert len(other.sample(prompt, 1, types.SamplingParams(max_tokens=4)).result(timeout=120).sequences) == 1
    assert alice.get("/api/v1/healthz").json() == {"status": "ok"}


def test_huge_weights_of_one_tenant_leave_the_other_tenants_training_unchanged(server):
    """Finding 2: B's forward_backward with weights 1e38 batched with A's made A's grad_norm NaN."""
    def run(service, seed):
        return service.create_lora_training_client(base_model=MODEL, rank=4, seed=seed).result()

    reference = run(server.sdk_client(ALICE), seed=7)
    ref_loss = reference.forward_backward(DATA, "cross_entropy").result().metrics["loss:sum"]
    ref_step = reference.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
    a, b = run(server.sdk_client(ALICE), seed=7), run(server.sdk_client(BOB), seed=8)
    hostile = [datum([5, 17, 33, 2, 9, 41, 7, 12], weight=1e38)]
    futures = [b.forward_backward(hostile, "cross_entropy"), a.forward_backward(DATA, "cross_entropy"),
               b.forward_backward(hostile, "cross_entropy")]  # queued together: they may share a batch
    with pytest.raises(Exception, match="weights"):
        futures[0].result(timeout=120)
    loss = futures[1].result(timeout=120).metrics["loss:sum"]
    step = a.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
    assert np.isfinite(loss) and loss == pytest.approx(ref_loss, rel=1e-6)
    assert np.isfinite(step["grad_norm"]) and step["grad_norm"] == pytest.approx(ref_step["grad_norm"], rel=1e-5)
    after = a.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
    assert np.isfinite(after) and after == pytest.approx(
        reference.forward(DATA, "cross_entropy").result().metrics["loss:sum"], rel=1e-6)


def test_a_refused_call_does_not_brick_the_run(server, alice):
    """Finding 3: after save_weights_external got a 404, load_state on the same client never completed."""
    tc = server.sdk_client(ALICE).create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    path = tc.save_state("before-refusal").result(timeout=120).path
    with pytest.raises(tinker.NotFoundError, match="not implemented"):
        tc.save_weights_external("outside").result(timeout=60)
    tc.load_state(path).result(timeout=60)
    tc.load_state_with_optimizer(path).result(timeout=60)
    assert tc.save_weights_and_get_sampling_client().result(timeout=120).sample(
        types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2)).result(timeout=120).sequences
    # The same with raw requests whose seq_ids are known: refused bodies and unknown endpoints fill their place.
    model_id = new_run(alice)
    assert alice.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 1,
                                                    "path": {"not": "a name"}}).status_code == 400
    assert alice.post("/api/v1/save_weights_external", json={"model_id": model_id, "seq_id": 2,
                                                             "path": "x"}).status_code == 404
    step = alice.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 3,
                                                  "adam_params": {"learning_rate": 1e-3}})
    assert "metrics" in result(alice, step)


def test_health_answers_within_a_second_while_a_50mb_prompt_is_refused(server, alice):
    """Finding 4: tokenizing a 50 MB prompt on the event loop blocked health checks for 60 s."""
    latencies, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=server.url, timeout=30) as health:
            while not done.is_set():
                start = time.monotonic()
                assert health.get("/api/v1/healthz").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        answer = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                            json={"model": MODEL, "prompt": "hello " * ((50 << 20) // 6), "max_tokens": 1},
                            timeout=120)
    finally:
        done.set()
        poller.join()
    assert answer.status_code == 413 and "--max-prompt-chars" in answer.json()["error"]["message"]
    assert len(latencies) >= 3 and max(latencies) < 1.0
    print(f"health during the 50 MB prompt: {len(latencies)} checks, max {max(latencies):.3f} s")
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b" " * (256 << 20))  # 8 KB that would decompress to 256 MiB
    refused = alice.post("/api/v1/create_session", content=bomb,
                         headers={"Content-Encoding": "zstd", "Content-Type": "application/json"})
    assert refused.status_code == 413 and "--max-body-mb" in refused.json()["detail"]
    metadata = alice.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t",
                                                          "user_metadata": {"blob": "x" * (1 << 20)}})
    assert metadata.status_code == 413 and "--max-metadata-kb" in metadata.json()["detail"]


def test_unpublishing_deleting_and_expiry_revoke_an_existing_client(server, alice):
    """Finding 6: a sampling client of another tenant kept sampling a checkpoint after it was unpublished."""
    tc = server.sdk_client(ALICE).create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    path = tc.save_weights_for_sampler("shared").result(timeout=120).path
    run_id, checkpoint_id = path.removeprefix("tinker://").split("/", 1)
    route = f"/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id}"
    assert alice.post(route + "/publish").status_code == 200
    sampler = server.sdk_client(BOB).create_sampling_client(model_path=path).result()
    prompt, params = types.ModelInput.from_ints([5, 6, 7]), types.SamplingParams(max_tokens=2)
    assert sampler.sample(prompt, 1, params).result(timeout=120).sequences
    assert alice.delete(route + "/publish").status_code == 200
    with pytest.raises(tinker.NotFoundError):
        sampler.sample(prompt, 1, params).result(timeout=60)
    assert alice.post(route + "/publish").status_code == 200
    assert sampler.sample(prompt, 1, params).result(timeout=120).sequences
    assert alice.put(route + "/ttl", json={"ttl_seconds": 0}).status_code == 200
    time.sleep(0.05)
    with pytest.raises(tinker.NotFoundError):
        sampler.sample(prompt, 1, params).result(timeout=60)


def _protobuf(model_id: str, tensor: pb.Tensor) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=model_id, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray([5, 6, 7], np.int32).tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensor)
    return msg.SerializeToString()


def hostile_bodies(model_id: str) -> list[tuple[str, str, bytes, dict]]:
    """(method, path, body, headers) of the requests that answered 500 (finding 8), and their siblings."""
    js = {"Content-Type": "application/json"}
    proto = {"Content-Type": "application/x-protobuf"}

    def j(value):
        return json.dumps(value).encode()

    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
    return [
        ("POST", "/api/v1/forward_backward", _protobuf(model_id, pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3],
                                                                            dense=b"\x01\x02\x03")), proto),
        ("POST", "/api/v1/forward_backward", _protobuf(model_id, pb.Tensor(dtype=pb.DTYPE_INT64, shape=[7],
                                                                            dense=bytes(24))), proto),
        ("POST", "/api/v1/forward_backward", _protobuf(model_id, pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1, 3],
                                                                            sparse_csr=pb.SparseCsr(
            crow_indices=np.asarray([0, 1], np.int64).tobytes(), col_indices=np.asarray([99], np.int64).tobytes(),
            values=np.asarray([1], np.int64).tobytes()))), proto),
        ("POST", "/api/v1/forward_backward", b"\x0a\xff\xff\xff\xff\x0f", proto),
        ("POST", "/api/v1/create_session", b"\x28\xb5\x2f\xfd garbage", {**js, "Content-Encoding": "zstd"}),
        ("POST", "/api/v1/create_session", b"[" * 100_000 + b"]" * 100_000, js),
        ("POST", "/api/v1/get_info", j({"model_id": {"a": 1}}), js),
        ("POST", "/api/v1/optim_step", j({"model_id": {"a": 1}, "adam_params": {}}), js),
        ("POST", "/api/v1/forward_backward", j({"model_id": {"a": 1}, "forward_backward_input": {"data": []}}), js),
        ("POST", "/api/v1/create_model", j({"session_id": "s", "model_seq_id": 0, "base_model": MODEL,
                                            "lora_config": {"rank": "abc"}}), js),
        ("POST", "/api/v1/create_model", j({"session_id": "s", "model_seq_id": 0, "base_model": MODEL,
                                            "lora_config": [4]}), js),
        ("POST", "/api/v1/asample", j({"base_model": MODEL, "prompt": prompt, "num_samples": "abc",
                                       "sampling_params": {"max_tokens": 2}}), js),
        ("POST", "/api/v1/asample", j({"base_model": MODEL, "prompt": "hello", "sampling_params": {}}), js),
        ("POST", "/api/v1/retrieve_future", j({"request_id": {"a": 1}}), js),
        ("GET", f"/api/v1/training_runs?limit={10**30}", b"", {}),
        ("GET", f"/api/v1/checkpoints?offset={-1}", b"", {}),
        ("POST", "/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "\\ud800 x"}', js),
        ("POST", "/v1/chat/completions", j({"model": MODEL, "messages": "hi"}), js),
        ("POST", "/v1/chat/completions", j({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                            "tools": [{"type": "function", "function": {"name": "f"}}]}), js),
        ("POST", "/api/v1/asample", b'{"base_model": "tiny-qwen3-moe", "prompt": {"chunks": []}, '
                                    b'"sampling_params": {"temperature": NaN}}', js),
        ("POST", "/api/v1/asample", j({"base_model": MODEL, "prompt": prompt,
                                       "sampling_params": {"temperature": "inf"}}), js),
        ("POST", "/v1/completions", b'{"model": "tiny-qwen3-moe", "prompt": "x", "temperature": 1e999}', js),
        ("POST", "/api/v1/optim_step", j({"model_id": model_id, "adam_params": {"learning_rate": -1e9}}), js),
        ("POST", "/api/v1/optim_step", b'{"model_id": "' + model_id.encode() + b'", "adam_params": '
                                       b'{"learning_rate": NaN}}', js),
        ("POST", "/api/v1/save_weights", j({"model_id": model_id, "path": "trail\n"}), js),
        ("POST", "/api/v1/save_weights", j({"model_id": model_id, "path": "..."}), js),
    ]


def test_hostile_bodies_get_one_line_4xx_and_keep_the_connection(server, alice):
    """Findings 8-10: each of these answered 500 (or was accepted) and reset the keep-alive connection."""
    model_id = new_run(alice)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    statuses = []
    for method, path, body, headers in hostile_bodies(model_id):
        connection.request(method, path, body=body, headers={"X-API-Key": ALICE, "Authorization": f"Bearer {ALICE}",
                                                             **headers})
        response = connection.getresponse()  # one connection throughout: a reset would raise here
        text = response.read().decode()
        statuses.append(response.status)
        assert 400 <= response.status < 500, (path, response.status, text)
        message = json.loads(text)
        line = message["detail"] if "detail" in message else message["error"]["message"]
        assert isinstance(line, str) and "\n" not in line and str(server.state_dir) not in line, (path, line)
    assert len(statuses) >= 21
    print(f"hostile bodies: {len(statuses)}, all 4xx ({', '.join(map(str, sorted(set(statuses))))})")
    connection.close()


def test_non_finite_training_parameters_are_refused_by_the_sdk_path(server):
    """Finding 9: a NaN beta or a NaN / -1e9 learning rate silently corrupted the caller's run."""
    tc = server.sdk_client(ALICE).create_lora_training_client(base_model=MODEL, rank=4, seed=4).result()
    with pytest.raises(Exception, match="finite|learning_rate"):
        tc.optim_step(types.AdamParams(learning_rate=-1e9)).result(timeout=60)
    with pytest.raises(Exception):
        tc.forward_backward(DATA, "cross_entropy", {"clip_low_threshold": float("nan")}).result(timeout=60)
    fine = tc.forward_backward(DATA, "cross_entropy").result(timeout=120).metrics["loss:sum"]
    assert np.isfinite(fine)
    assert np.isfinite(tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60).metrics["grad_norm"])


def test_another_tenants_ids_are_refused_on_every_route_and_change_nothing(server, alice, bob):
    """Bob replays each of Alice's ids (run, session, sampler, checkpoints, a future) on every route that takes
    one: each is a 4xx (or a future that settles to an error), Alice's lists do not show through, and Alice's
    run, checkpoints and sampler are as they were."""
    session = alice.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    made = alice.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": MODEL,
                                                    "lora_config": {"rank": 4, "seed": 3}})
    run = made.json()["model_id"]
    assert "error" not in result(alice, made)
    weights = result(alice, alice.post("/api/v1/save_weights", json={"model_id": run, "path": "mine", "seq_id": 1}))
    sampler_weights = result(alice, alice.post("/api/v1/save_weights_for_sampler",
                                               json={"model_id": run, "path": "mine-s", "seq_id": 2}))
    path, sampler_path = weights["path"], sampler_weights["path"]
    sampler = alice.post("/api/v1/create_sampling_session", json={
        "session_id": session, "sampling_session_seq_id": 0, "model_path": sampler_path}).json()["sampling_session_id"]
    chunk = {"chunks": [{"type": "encoded_text", "tokens": [5, 17, 33]}]}
    tensor = lambda values, dtype: {"data": values, "dtype": dtype, "shape": [len(values)]}  # noqa: E731
    data = [{"model_input": chunk, "loss_fn_inputs": {"target_tokens": tensor([17, 33, 2], "int64"),
                                                      "weights": tensor([1.0, 1.0, 1.0], "float32")}}]
    forward = {"model_id": run, "forward_input": {"data": data, "loss_fn": "cross_entropy"}, "seq_id": 3}
    alice_forward = alice.post("/api/v1/forward", json=forward)
    before = result(alice, alice_forward)
    bob_session = bob.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    params = {"max_tokens": 2, "seed": 1}
    checkpoint = "weights/mine"
    attempts = [
        ("POST", "/api/v1/get_info", {"model_id": run}),
        ("POST", "/api/v1/forward", {**forward, "seq_id": 4}),
        ("POST", "/api/v1/forward_backward", {"model_id": run, "seq_id": 4,
                                              "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"}}),
        ("POST", "/api/v1/optim_step", {"model_id": run, "seq_id": 4, "adam_params": {"learning_rate": 1.0}}),
        ("POST", "/api/v1/save_weights", {"model_id": run, "seq_id": 4, "path": "stolen"}),
        ("POST", "/api/v1/save_weights", {"model_id": run, "seq_id": 4, "path": "mine", "overwrite": True}),
        ("POST", "/api/v1/save_weights_for_sampler", {"model_id": run, "seq_id": 4, "path": "stolen"}),
        ("POST", "/api/v1/load_weights", {"model_id": run, "seq_id": 4, "path": path}),
        ("POST", "/api/v1/load_weights", {"session_id": bob_session, "model_seq_id": 0, "path": path}),
        ("POST", "/api/v1/unload_model", {"model_id": run}),
        ("POST", "/api/v1/create_model", {"session_id": session, "model_seq_id": 1, "base_model": MODEL}),
        ("POST", "/api/v1/create_sampling_session", {"session_id": session, "sampling_session_seq_id": 1,
                                                     "base_model": MODEL}),
        ("POST", "/api/v1/create_sampling_session", {"session_id": bob_session, "sampling_session_seq_id": 0,
                                                     "model_path": sampler_path}),
        ("POST", "/api/v1/create_sampling_session", {"session_id": bob_session, "sampling_session_seq_id": 1,
                                                     "model_path": path}),
        ("GET", f"/api/v1/samplers/{sampler}", None),
        ("POST", "/api/v1/asample", {"sampling_session_id": sampler, "prompt": chunk, "num_samples": 1,
                                     "sampling_params": params}),
        ("POST", "/api/v1/asample", {"model_path": sampler_path, "prompt": chunk, "num_samples": 1,
                                     "sampling_params": params}),
        ("POST", "/api/v1/asample", {"model_path": path, "prompt": chunk, "num_samples": 1, "sampling_params": params}),
        ("POST", "/api/v1/retrieve_future", {"request_id": alice_forward.json()["request_id"]}),
        ("POST", "/api/v1/session_heartbeat", {"session_id": session}),
        ("POST", f"/api/v1/sessions/{session}/finish", {}),
        ("GET", f"/api/v1/sessions/{session}", None),
        ("GET", f"/api/v1/training_runs/{run}", None),
        ("GET", f"/api/v1/training_runs/{run}/checkpoints", None),
        ("POST", f"/api/v1/training_runs/{run}/checkpoints/{checkpoint}/publish", None),
        ("DELETE", f"/api/v1/training_runs/{run}/checkpoints/{checkpoint}/publish", None),
        ("PUT", f"/api/v1/training_runs/{run}/checkpoints/{checkpoint}/ttl", {"ttl_seconds": 1}),
        ("DELETE", f"/api/v1/training_runs/{run}/checkpoints/{checkpoint}", None),
        ("DELETE", f"/api/v1/training_runs/{run}/checkpoints/sampler_weights/mine-s", None),
        ("POST", "/api/v1/weights_info", {"tinker_path": path}),
        ("POST", "/api/v1/weights_info", {"tinker_path": sampler_path}),
        ("POST", "/v1/completions", {"model": sampler_path, "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/completions", {"model": path, "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": sampler_path, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 2}),
        ("POST", "/oai/api/v1/completions", {"model": sampler_path, "prompt": "hi", "max_tokens": 2}),
    ]
    statuses = []
    for method, url, body in attempts:
        answer = bob.request(method, url, json=body, headers={"Authorization": f"Bearer {BOB}"})
        statuses.append(answer.status_code)
        assert str(server.state_dir) not in answer.text, (url, answer.text[:300])
        if answer.status_code == 200:  # a future that must settle to an error, or a Tinker-shaped error result
            settled = result(bob, answer) if "request_id" in answer.json() else answer.json()
            assert "error" in settled, (url, settled)
            continue
        assert 400 <= answer.status_code < 500, (method, url, answer.status_code, answer.text[:300])
    lists = [bob.get("/api/v1/training_runs").text, bob.get("/api/v1/checkpoints").text,
             bob.get("/api/v1/sessions").text]
    assert not any(run in text or session in text for text in lists)
    after = result(alice, alice.post("/api/v1/forward", json={**forward, "seq_id": 4}))
    assert after == before  # bitwise: nothing Bob sent reached Alice's adapter
    listed = {c["checkpoint_id"] for c in alice.get(f"/api/v1/training_runs/{run}/checkpoints").json()["checkpoints"]}
    assert listed == {"weights/mine", "sampler_weights/mine-s"}
    sampled = result(alice, alice.post("/api/v1/asample", json={"sampling_session_id": sampler, "prompt": chunk,
                                                                "num_samples": 1, "sampling_params": params}))
    assert sampled["sequences"], sampled
    print(f"cross-tenant attempts: {len(attempts)}, 4xx {sum(400 <= s < 500 for s in statuses)}, "
          f"error results {statuses.count(200)}, 5xx {sum(s >= 500 for s in statuses)}")


# ------------------------------------------------------------------------------------------------ the fuzzer


def _resolve(spec: dict, schema: dict, depth: int = 0) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = (spec.get("components", {}).get("schemas", {}).get(name) or
                  schema.get("$defs", {}).get(name) or spec.get("$defs", {}).get(name))
    return schema


def fuzz_value(rng: random.Random, spec: dict, schema: dict, depth: int = 0):
    """A value for `schema`: usually of its type (within or just outside its bounds), sometimes of another
    type entirely; nested no deeper than 4."""
    schema = _resolve(spec, schema or {})
    if rng.random() < 0.15 or depth > 4:
        return rng.choice([None, -1, 0, 2**70, 1e300, -1e-300, "", "x" * 300, "tinker://a/weights/b", [], {},
                           True, [1, 2], {"a": "b"}, "\u00e9\u4e2d"])
    for union in ("anyOf", "oneOf"):
        if union in schema:
            return fuzz_value(rng, spec, rng.choice(schema[union]), depth)
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        return rng.choice(schema.get("enum", [schema.get("const")]))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return {k: fuzz_value(rng, {**spec, "$defs": {**spec.get("$defs", {}), **schema.get("$defs", {})}}, v,
                              depth + 1)
                for k, v in props.items() if k in required or rng.random() < 0.6}
    if kind == "array":
        return [fuzz_value(rng, spec, schema.get("items", {}), depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "integer":
        low, high = schema.get("minimum", -2**63), schema.get("maximum", schema.get("exclusiveMaximum", 2**63))
        return rng.choice([low, high, low - 1, high + 1, rng.randint(-5, 40)])
    if kind == "number":
        return rng.choice([0.0, 1.0, -1.0, 1e-12, 1e300, -1e300, rng.uniform(-3, 3)])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        # Not the served model's name: the fuzzer checks validation, it does not start real sampling work.
        return rng.choice(["", "a", "tinker://x/weights/y", "\u00e9", "a" * 5000, "../../etc", "0"])
    return None


def test_a_schema_driven_fuzz_run_over_every_request_body_has_no_server_errors(server, alice, bob):
    spec = alice.get("/openapi.json").json()
    operations = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content:
                schema = content["schema"]
                operations.append((method.upper(), path, {**spec, "$defs": schema.get("$defs", {})}, schema))
    assert len(operations) >= 15  # every JSON route of the Tinker API and the OpenAI routes
    rng, counts = random.Random(18), {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0}
    failures = []
    for method, path, defs, schema in operations:
        concrete = path.replace("{run_id}", "run").replace("{checkpoint_id}", "weights/x").replace(
            "{session_id}", "s")
        for i in range(12):
            body = fuzz_value(rng, defs, schema)
            client = alice if i % 2 else bob
            answer = client.request(method, concrete, json=body, timeout=60)
            counts["requests"] += 1
            counts[f"{answer.status_code // 100}xx"] = counts.get(f"{answer.status_code // 100}xx", 0) + 1
            if answer.status_code >= 500:
                failures.append((path, body, answer.text[:300]))
    print("fuzz counts:", json.dumps(counts), "operations:", len(operations))
    assert not failures, failures[:3]
    assert alice.get("/api/v1/healthz").status_code == 200


# ------------------------------------------------------------------------------------------------ crashes


def forward_logprobs(tc) -> np.ndarray:
    out = tc.forward(DATA, "cross_entropy").result(timeout=120)
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def test_sigkill_during_an_overwrite_save_keeps_a_loadable_checkpoint(server):
    """Finding 5: a SIGKILL 20-60 ms into `save_weights(overwrite=True)` left the listed checkpoint without
    meta.json or state/. Now the old one loads, or the new one if its save completed."""
    runs = []
    for seed in (5, 6):  # one save completes before the kill, one is killed 30 ms in
        tc = server.sdk_client(ALICE).create_lora_training_client(base_model=MODEL, rank=4, seed=seed).result()
        tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        path = tc.save_state("ow").result(timeout=120).path
        old = forward_logprobs(tc)
        tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        new = forward_logprobs(tc)
        assert not np.array_equal(old, new)
        runs.append((tc.model_id, path, old, new))
    raw = httpx.Client(base_url=server.url, headers={"X-API-Key": ALICE}, timeout=60)
    saves = []
    for i, (model_id, *_) in enumerate(runs):
        started = raw.post("/api/v1/save_weights", json={"model_id": model_id, "path": "ow", "overwrite": True})
        if i == 0:
            result(raw, started)
        saves.append(started.json()["request_id"])
    time.sleep(0.03)
    server.kill()
    server.clients = []
    server.start()
    outcomes = []
    for request_id, (model_id, path, old, new) in zip(saves, runs):
        completed = "error" not in raw.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        listed = [c["checkpoint_id"] for c in raw.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()[
            "checkpoints"]]
        assert listed == ["weights/ow"]
        loaded = server.sdk_client(ALICE).create_training_client_from_state(path).result(timeout=120)
        assert np.array_equal(forward_logprobs(loaded), new if completed else old)
        outcomes.append(completed)
    assert outcomes[0] is True
    leftovers = [p.name for p in server.state_dir.rglob(".ow.*")]
    assert not leftovers, leftovers
    print("kill outcomes (completed?):", outcomes, "recovery:", server.log().splitlines()[-1][:400])


def test_sigterm_stops_the_server_within_ten_seconds(server):
    tc = server.sdk_client(BOB).create_sampling_client(base_model=MODEL).result()
    tc.sample(types.ModelInput.from_ints([1, 2]), 4, types.SamplingParams(max_tokens=64))  # in flight
    start = time.monotonic()
    server.process.terminate()
    server.process.wait(20)
    print(f"SIGTERM to exit: {time.monotonic() - start:.1f} s")
    assert time.monotonic() - start < 10
    server.clients = []
