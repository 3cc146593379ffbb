"""`jtinker serve` driven over real loopback HTTP by the official `tinker` SDK (0.38.0), unmodified.

One server per module (a subprocess of the real CLI). Tests run in file order; the last one SIGKILLs and
restarts that server.
"""

import concurrent.futures

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

ALICE, BOB = "tml-alice", "tml-bob"
MODEL = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def server(tmp_path_factory, jax_cache_dir, jtinker_server):
    state = tmp_path_factory.mktemp("server-state")
    srv = jtinker_server([MODEL], state, tmp_path_factory.mktemp("server-log") / "server.log", api_keys=(ALICE, BOB), jax_cache=jax_cache_dir,
                        extra_args=("--poll-seconds", "5", "--fwdbwd-max-chunk-len", "2", "--slots", "24",
                                    "--max-lora-rank", "16"))
    srv.start()
    yield srv
    srv.stop()


def service(server, key=ALICE):
    return server.sdk_client(key)


def conversations(tokenizer, n, offset=0):
    """Chat datums (prompt tokens weight 0, answer tokens weight 1) of different lengths."""
    from jtinker.sft import builtin_arithmetic, conversation_datum

    data = []
    for conversation in builtin_arithmetic(n + offset)[offset:]:
        d = conversation_datum(tokenizer, conversation)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(d.tokens.tolist()),
                                loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"].tolist(),
                                                "weights": d.loss_fn_inputs["weights"].tolist()}))
    return data


def loss_of(out) -> float:
    return out.metrics["loss:sum"]


ADAM = types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)


def trained_and_saved(svc, seed: int, name: str):
    """A rank-8 client after two SFT steps on 3 conversations, saved with its optimizer as `name`:
    (client, data, tinker:// path)."""
    tc = svc.create_lora_training_client(base_model=MODEL, rank=8, seed=seed).result()
    data = conversations(tc.get_tokenizer(), 3)
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(ADAM)
    return tc, data, tc.save_state(name).result().path


def test_training_over_http_with_chunked_forward_backward(server):
    svc = service(server)
    tc = svc.create_lora_training_client(base_model=MODEL, rank=8, seed=3).result()
    info = tc.get_info()
    assert info.lora_rank == 8 and info.model_data.arch == "qwen3_moe" and info.model_id == tc.model_id
    assert tc.model_id.endswith(":train:0")
    tokenizer = tc.get_tokenizer()  # the SDK's own AutoTokenizer.from_pretrained(tokenizer_id), offline
    assert tokenizer.decode(tokenizer.encode("What is 2 + 3?")) == "What is 2 + 3?"
    data = conversations(tokenizer, 4)
    assert len({d.model_input.length for d in data}) > 1
    # 4 datums, chunks of 2: the SDK sends 2 requests (the first one last) that the server runs in seq_id order
    first = tc.forward_backward(data, "cross_entropy").result()
    assert list(first.metrics) == ["loss:sum"] and len(first.loss_fn_outputs) == 4
    for d, out in zip(data, first.loss_fn_outputs):
        lp = out["logprobs"].to_numpy()
        assert lp.shape == (d.model_input.length,) and np.all(lp <= 0)
        weights = np.asarray(d.loss_fn_inputs["weights"].to_numpy())
        np.testing.assert_allclose(out["elementwise_loss"].to_numpy(), -lp * weights, rtol=1e-5, atol=1e-6)
    expected = sum(float(-(o["logprobs"].to_numpy() * np.asarray(d.loss_fn_inputs["weights"].to_numpy())).sum())
                   for d, o in zip(data, first.loss_fn_outputs))
    assert loss_of(first) == pytest.approx(expected, rel=1e-5)
    step = tc.optim_step(ADAM).result()
    assert step.metrics["grad_norm"] > 0
    # both chunks' gradients were applied: the same data sent as two separate calls gives the same step, the
    # first chunk alone does not
    twin = svc.create_lora_training_client(base_model=MODEL, rank=8, seed=3).result()
    for part in (data[:2], data[2:]):
        twin.forward_backward(part, "cross_entropy").result()
    twin.optim_step(ADAM).result()
    partial = svc.create_lora_training_client(base_model=MODEL, rank=8, seed=3).result()
    partial.forward_backward(data[:2], "cross_entropy").result()
    partial.optim_step(ADAM).result()
    after = loss_of(tc.forward(data, "cross_entropy").result())
    assert after < loss_of(first)
    assert loss_of(twin.forward(data, "cross_entropy").result()) == pytest.approx(after, rel=1e-6)
    assert loss_of(partial.forward(data, "cross_entropy").result()) != pytest.approx(after, rel=1e-4)
    for _ in range(4):  # requests pipelined without waiting: ordering is the server's job
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(ADAM)
    assert loss_of(tc.forward(data, "cross_entropy").result()) < 0.8 * loss_of(first)
    svc.close("success")


def _rl_inputs(data, outputs, rng):
    """Per-token sampler log-probs near the policy's, advantages, and a sequence mask (the prompt excluded)."""
    inputs = []
    for d, o in zip(data, outputs):
        lp = o["logprobs"].to_numpy()
        mask = (np.asarray(d.loss_fn_inputs["weights"].to_numpy()) > 0).astype(np.float32)
        inputs.append({"target_tokens": d.loss_fn_inputs["target_tokens"].to_numpy(),
                       "logprobs": (lp + rng.normal(0, 0.3, lp.shape)).astype(np.float32),
                       "advantages": (rng.normal(0, 1, lp.shape) * mask).astype(np.float32), "mask": mask})
    return inputs


def _expected(loss_fn, lp, x, config):
    q, a = x["logprobs"], x["advantages"]
    r = np.exp(lp - q)
    low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if loss_fn == "importance_sampling":
        return -(r * a).sum()
    if loss_fn == "ppo":
        return -np.minimum(r * a, np.clip(r, low, high) * a).sum()
    if loss_fn == "cispo":
        return -(np.clip(r, low, high) * lp * a).sum()
    if loss_fn == "dro":
        return -(lp * a - 0.5 * config["beta"] * (lp - q) ** 2).sum()
    s = np.exp(((lp - q) * x["mask"]).sum() / x["mask"].sum())  # gspo: the sequence ratio on every token
    return -np.minimum(s * a, np.clip(s, low, high) * a).sum()


@pytest.mark.parametrize("loss_fn,config", [("importance_sampling", {}), ("ppo", {"clip_high_threshold": 1.1}),
                                            ("cispo", {}), ("dro", {"beta": 0.5}), ("gspo", {})])
def test_every_rl_loss_over_http(server, loss_fn, config):
    svc = service(server)
    tc = svc.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    data = conversations(tc.get_tokenizer(), 2)
    policy = tc.forward(data, "cross_entropy").result().loss_fn_outputs
    rng = np.random.default_rng(0)
    inputs = _rl_inputs(data, policy, rng)
    rl = []
    for d, x in zip(data, inputs):
        fields = {k: types.TensorData.from_numpy(np.asarray(v)) for k, v in x.items() if k != "mask"}
        if loss_fn == "gspo":
            fields["sequence_ratio_mask"] = types.TensorData.from_numpy(x["mask"])
        rl.append(types.Datum(model_input=d.model_input, loss_fn_inputs=fields))
    out = tc.forward_backward(rl, loss_fn, config or None).result()
    expected = sum(_expected(loss_fn, o["logprobs"].to_numpy().astype(np.float64), x, config)
                   for o, x in zip(policy, inputs))
    assert loss_of(out) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    for o, p in zip(out.loss_fn_outputs, policy):  # the policy did not change: same log-probs
        np.testing.assert_allclose(o["logprobs"].to_numpy(), p["logprobs"].to_numpy(), atol=1e-5)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm"] > 0
    svc.close("success")


def test_sampling_over_http(server):
    svc = service(server)
    tc = svc.create_lora_training_client(base_model=MODEL, rank=8, seed=5).result()
    tokenizer = tc.get_tokenizer()
    data = conversations(tokenizer, 4)
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2, grad_clip_norm=1.0))
    sampler = tc.save_weights_and_get_sampling_client().result()
    assert sampler.get_base_model() == MODEL
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = types.ModelInput.from_ints(tokenizer.encode(text))
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    out = sampler.sample(prompt, 2, greedy, include_prompt_logprobs=True).result()
    a, b = out.sequences
    assert a.tokens == b.tokens and len(a.tokens) == 6 and a.stop_reason == "length"
    assert a.sequence_id != b.sequence_id and a.sequence_id and b.sequence_id
    full = types.ModelInput.from_ints(prompt.to_ints() + a.tokens)
    logprobs = sampler.compute_logprobs(full).result()
    assert logprobs[0] is None and len(logprobs) == full.length
    np.testing.assert_allclose(a.logprobs, logprobs[-6:], atol=1e-5)  # on-policy log-probs
    np.testing.assert_allclose(out.prompt_logprobs[1:], logprobs[1:prompt.length], atol=1e-5)
    datum = types.Datum(model_input=types.ModelInput.from_ints(full.to_ints()[:-1]),
                        loss_fn_inputs={"target_tokens": full.to_ints()[1:], "weights": [1.0] * (full.length - 1)})
    fb = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(fb, logprobs[1:], atol=1e-5)  # the sampler's snapshot is the trainer's adapter
    last = sampler.compute_logprobs(full, prompt_logprobs_last_n=3).result()
    assert last[:-3] == [None] * (full.length - 3)
    np.testing.assert_allclose(last[-3:], logprobs[-3:], atol=1e-6)
    # a stop token ends a sample and is kept; seeded sampling repeats
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[a.tokens[1]]))
    assert stopped.result().sequences[0].tokens == a.tokens[:2]
    assert stopped.result().sequences[0].stop_reason == "stop"
    seeded = types.SamplingParams(max_tokens=5, temperature=1.0, seed=11)
    assert ([s.tokens for s in sampler.sample(prompt, 3, seeded).result().sequences]
            == [s.tokens for s in sampler.sample(prompt, 3, seeded).result().sequences])
    # a named sampler checkpoint gives the same samples; the snapshot does not follow later training
    named = tc.save_weights_for_sampler("sampler-a").result().path
    assert named.endswith("/sampler_weights/sampler-a")
    from_path = svc.create_sampling_client(model_path=named).result()
    assert from_path.sample(prompt, 1, greedy).result().sequences[0].tokens == a.tokens
    tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert sampler.compute_logprobs(full).result() == logprobs
    base = svc.create_sampling_client(base_model=MODEL).result()
    base_lp = base.compute_logprobs(full).result()
    assert base_lp != logprobs and all(v <= 0 for v in base_lp[1:])
    svc.close("success")


def test_save_state_then_a_new_client_from_it(server):
    svc = service(server)
    tc, data, path = trained_and_saved(svc, seed=7, name="state-2")
    assert path == f"tinker://{tc.model_id}/weights/state-2"
    now = loss_of(tc.forward(data, "cross_entropy").result())
    resumed = svc.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().lora_rank == 8
    assert loss_of(resumed.forward(data, "cross_entropy").result()) == now
    for client in (tc, resumed):  # with the optimizer state, both continue identically
        client.forward_backward(data, "cross_entropy")
        client.optim_step(ADAM).result()
    assert loss_of(resumed.forward(data, "cross_entropy").result()) == pytest.approx(
        loss_of(tc.forward(data, "cross_entropy").result()), rel=1e-6)
    weights_only = svc.create_training_client_from_state(path).result()
    assert loss_of(weights_only.forward(data, "cross_entropy").result()) == now
    with pytest.raises(tinker.RequestFailedError, match="exists"):
        tc.save_state("state-2").result()
    assert tc.save_state("state-2", overwrite=True).result().path == path
    svc.close("success")


def test_checkpoints_list_ttl_publish_delete(server):
    svc = service(server)
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    tc = svc.create_lora_training_client(base_model=MODEL, rank=4, seed=0).result()
    a = tc.save_state("ck-a").result().path
    b = tc.save_weights_for_sampler("ck-b").result().path
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.checkpoint_id for c in listed} == {"weights/ck-a", "sampler_weights/ck-b"}
    assert {c.checkpoint_type for c in listed} == {"training", "sampler"}
    assert all(c.size_bytes > 0 and not c.public and c.expires_at is None for c in listed)
    mine = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    assert {a, b} <= mine
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == MODEL and run.lora_rank == 4 and run.last_checkpoint.tinker_path == a
    assert run.last_sampler_checkpoint.tinker_path == b
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs}
    info = rest.get_weights_info_by_tinker_path(a).result()
    assert info.base_model == MODEL and info.lora_rank == 4 and info.train_mlp
    rest.set_checkpoint_ttl_from_tinker_path(a, 3600).result()
    rest.publish_checkpoint_from_tinker_path(a).result()
    ck = {c.checkpoint_id: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}["weights/ck-a"]
    assert ck.public and ck.expires_at is not None
    rest.unpublish_checkpoint_from_tinker_path(a).result()
    rest.delete_checkpoint_from_tinker_path(b).result()
    assert [c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == ["weights/ck-a"]
    with pytest.raises(Exception, match="no checkpoint"):
        svc.create_sampling_client(model_path=b).result()
    rest.set_checkpoint_ttl_from_tinker_path(a, 0).result()  # expired: gone from lists and loads at once
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    with pytest.raises(tinker.RequestFailedError, match="no checkpoint"):
        svc.create_training_client_from_state(a).result()
    # names cannot escape the state directory: refused (400) before the request takes its place in the run
    with pytest.raises(tinker.BadRequestError, match="checkpoint name"):
        tc.save_state("../../escape").result()
    with pytest.raises(tinker.RequestFailedError, match="not a checkpoint path"):
        svc.create_training_client_from_state(f"tinker://{tc.model_id}/weights/..").result()
    assert not any(p.name == "escape" for p in server.state_dir.parent.rglob("*"))
    svc.close("success")


def test_errors_are_one_line_and_categorised(server):
    svc = service(server)
    tc = svc.create_lora_training_client(base_model=MODEL, rank=4).result()
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0]})
    with pytest.raises(tinker.RequestFailedError, match=r"'weights'\] has shape \[2\], expected \[3\]") as error:
        tc.forward_backward([bad], "cross_entropy").result()
    assert error.value.category == types.RequestErrorCategory.User
    with pytest.raises(tinker.RequestFailedError, match="LoRA rank must be in"):
        svc.create_lora_training_client(base_model=MODEL, rank=64).result()
    with pytest.raises(tinker.RequestFailedError, match="unknown base model"):
        svc.create_lora_training_client(base_model="no-such-model", rank=4).result()
    with pytest.raises(tinker.AuthenticationError):
        server.sdk_client("tml-intruder").create_lora_training_client(
            base_model=MODEL, rank=4)
    caps = svc.get_server_capabilities()
    assert [m.model_name for m in caps.supported_models] == [MODEL]
    svc.close("success")


def test_tenants_are_isolated_until_a_checkpoint_is_published(server):
    alice, bob = service(server, ALICE), service(server, BOB)
    alice_rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    bob_rest = tinker.RestClient(base_url=server.url, api_key=BOB)
    tc = alice.create_lora_training_client(base_model=MODEL, rank=4, seed=9).result()
    path = tc.save_state("private").result().path
    sampler_path = tc.save_weights_for_sampler("private-s").result().path
    with pytest.raises(tinker.NotFoundError):
        bob_rest.list_checkpoints(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_training_run(tc.model_id).result()
    assert path not in {c.tinker_path for c in bob_rest.list_user_checkpoints().result().checkpoints}
    assert tc.model_id not in {r.training_run_id for r in bob_rest.list_training_runs().result().training_runs}
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=sampler_path).result()
    with pytest.raises(tinker.RequestFailedError, match="no checkpoint"):
        bob.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(path).result()
    alice_rest.publish_checkpoint_from_tinker_path(path).result()
    data = conversations(tc.get_tokenizer(), 2)
    copy = bob.create_training_client_from_state(path).result()  # published: readable by every tenant
    assert loss_of(copy.forward(data, "cross_entropy").result()) == loss_of(tc.forward(data, "cross_entropy").result())
    assert bob_rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4
    with pytest.raises(tinker.NotFoundError):  # ... but still only its owner's to change
        bob_rest.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=sampler_path).result()  # not published
    alice.close("success")
    bob.close("success")


def test_eight_concurrent_clients_get_their_own_results(server):
    def job(i):
        svc = service(server, ALICE if i % 2 else BOB)
        tc = svc.create_lora_training_client(base_model=MODEL, rank=2 + i % 3, seed=100 + i).result()
        data = conversations(tc.get_tokenizer(), 2, offset=i)
        losses = []
        for _ in range(3):
            out = tc.forward_backward(data, "cross_entropy").result()
            assert [o["logprobs"].shape[0] for o in out.loss_fn_outputs] == [d.model_input.length for d in data]
            losses.append(loss_of(out))
            tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        lp = sampler.compute_logprobs(data[0].model_input).result()
        svc.close("success")
        return losses, lp

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(job, range(8)))
    # replayed one client at a time, every client gets the same numbers: nothing lost, nothing crossed
    for i in (0, 5):
        alone_losses, alone_lp = job(i)
        np.testing.assert_allclose(results[i][0], alone_losses, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(results[i][1][1:]), np.asarray(alone_lp[1:]), atol=1e-4)
    assert len({round(r[0][0], 3) for r in results}) == 8  # different adapters and data: all different
    assert all(r[0][2] != r[0][0] for r in results)  # and every client's optim_steps took effect


def test_extra_routes_mount_and_resolve_tinker_paths(server):
    """The mount point for the OpenAI-compatible routes: a router factory gets a context that resolves model
    names and tinker:// paths with the caller's key (tenants apply)."""
    from fastapi import APIRouter, Header
    from fastapi.testclient import TestClient

    from jtinker.server.app import create_app
    from jtinker.server.runtime import Runtime

    svc = service(server)
    tc = svc.create_lora_training_client(base_model=MODEL, rank=4).result()
    path = tc.save_weights_for_sampler("for-oai").result().path
    svc.close("success")

    def factory(context):
        router = APIRouter(prefix="/oai/api/v1")

        @router.get("/resolve")
        def resolve(model: str, authorization: str = Header("")):
            target = context.resolve(model, authorization.removeprefix("Bearer "))
            return {"base_model": target.base_model, "adapter": target.adapter}

        return router

    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # a second server process's view of the same state (a copy)
        shutil.copytree(server.state_dir, tmp, dirs_exist_ok=True)
        app = create_app(Runtime([MODEL], tmp), [ALICE, BOB], extra_routes=[factory])
        with TestClient(app) as http:
            ok = http.get("/oai/api/v1/resolve", params={"model": path}, headers={"Authorization": f"Bearer {ALICE}"})
            assert ok.status_code == 200 and ok.json()["base_model"] == MODEL
            assert ok.json()["adapter"].endswith("sampler_weights/for-oai")
            assert http.get("/oai/api/v1/resolve", params={"model": MODEL},
                            headers={"Authorization": f"Bearer {BOB}"}).json() == {"base_model": MODEL,
                                                                                  "adapter": None}
            other = http.get("/oai/api/v1/resolve", params={"model": path}, headers={"Authorization": f"Bearer {BOB}"})
            assert other.status_code == 404
            assert http.get("/oai/api/v1/resolve", params={"model": path}).status_code == 401


def test_sigkill_mid_training_then_restart_loses_nothing_acknowledged(server):
    import httpx

    svc = service(server)
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    tc, data, saved = trained_and_saved(svc, seed=21, name="before-kill")
    acknowledged = loss_of(tc.forward(data, "cross_entropy").result())
    # a raw request whose result was acknowledged (stored) before the crash
    headers = {"X-API-Key": ALICE}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        sampler_id = http.post("/api/v1/create_sampling_session", json={
            "session_id": svc.holder.get_session_id(), "sampling_session_seq_id": 99, "base_model": MODEL}).json()
        request = {"sampling_session_id": sampler_id["sampling_session_id"], "seq_id": 0, "num_samples": 1,
                   "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 20, 30]}]},
                   "sampling_params": {"max_tokens": 3, "temperature": 0.0}}
        request_id = http.post("/api/v1/asample", json=request).json()["request_id"]
        before = {"type": "try_again"}
        while before.get("type") == "try_again":  # long polls of --poll-seconds until the result is there
            before = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
    assert len(before["sequences"][0]["tokens"]) == 3
    in_flight = [tc.forward_backward(data, "cross_entropy") for _ in range(3)]
    server.kill()  # SIGKILL, mid-training
    server.start()
    for future in in_flight:  # resolved (done before the kill) or failed, never a hang: lost work says the
        try:  # server restarted; a request first sent after the restart is told the run is not loaded
            future.result(timeout=120)
        except tinker.RequestFailedError as error:
            assert "restarted" in str(error) or "not loaded" in str(error)
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        assert http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json() == before
    with pytest.raises(tinker.RequestFailedError, match="not loaded"):  # the old run's slot is gone: say so
        tc.forward(data, "cross_entropy").result(timeout=60)
    assert saved in {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert rest.get_training_run(tc.model_id).result().last_checkpoint.tinker_path == saved
    fresh = service(server)
    resumed = fresh.create_training_client_from_state_with_optimizer(saved).result()
    assert loss_of(resumed.forward(data, "cross_entropy").result()) == acknowledged
    resumed.forward_backward(data, "cross_entropy")
    resumed.optim_step(ADAM).result()
    assert loss_of(resumed.forward(data, "cross_entropy").result()) < acknowledged
    fresh.close("success")
    assert "Traceback" not in server.log()
