"""The in-process Tinker API with the official SDK's types: `import jtinker as tinker`."""

import asyncio

import numpy as np
import pytest

import jtinker as tinker
from jtinker.sft import builtin_arithmetic, conversation_datum


def _sdk_datums(tokenizer, n=6):
    data = []
    for conversation in builtin_arithmetic(n):
        d = conversation_datum(tokenizer, conversation)
        data.append(tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(d.tokens.tolist()),
            loss_fn_inputs={"target_tokens": tinker.TensorData.from_numpy(d.loss_fn_inputs["target_tokens"]),
                            "weights": tinker.TensorData.from_numpy(d.loss_fn_inputs["weights"])}))
    return data


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    return tinker.ServiceClient(state_dir=tmp_path_factory.mktemp("state"), num_slots=10, max_rank=16)


def test_sft_loop_written_against_the_sdk(service):
    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=8, seed=0)
    info = client.get_info()
    assert info.lora_rank == 8 and info.model_data.arch == "qwen3_moe"
    data = _sdk_datums(client.get_tokenizer())
    first = client.forward_backward(data, "cross_entropy").result()
    assert set(first.metrics) == {"loss:sum"} and len(first.loss_fn_outputs) == len(data)
    lp = first.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert lp.shape == (len(data[0].model_input.to_ints()),) and np.all(lp <= 0)
    client.optim_step(tinker.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()
    for _ in range(15):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()

    async def awaited():
        return await client.forward(data, "cross_entropy")

    now = asyncio.run(awaited())
    assert now.metrics["loss:sum"] < 0.5 * first.metrics["loss:sum"]

    saved = client.save_state("step16").result()
    assert saved.path.startswith("tinker://") and saved.path.endswith("/weights/step16")
    restored = service.create_training_client_from_state(saved.path)
    again = restored.forward(data, "cross_entropy").result()
    assert again.metrics["loss:sum"] == now.metrics["loss:sum"]  # the same adapter, in another slot
    fresh = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=8, seed=0)
    assert fresh.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        first.metrics["loss:sum"], rel=1e-6)  # a new client starts from a fresh adapter


def test_errors_surface_through_the_future_and_change_nothing(service):
    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=4)
    bad = tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints([1, 2, 3]),
                             loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0]})
    future = client.forward_backward([bad], "cross_entropy")
    with pytest.raises(ValueError, match="'weights'] has shape \\[2\\], expected \\[3\\]"):
        future.result()
    with pytest.raises(ValueError, match="LoRA rank must be in \\[1, 16\\]"):
        service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=64)
    with pytest.raises(ValueError, match="not a checkpoint path"):
        service.create_training_client_from_state("tinker://run/weights/../../etc")
    with pytest.raises(ValueError, match="checkpoint name"):
        client.save_state("../escape").result()


def test_sampling_is_consistent_with_training_logprobs(service):
    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=8, seed=1)
    tokenizer = client.get_tokenizer()
    data = _sdk_datums(tokenizer, 4)
    for _ in range(5):
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()
    sampler = client.save_weights_and_get_sampling_client()
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                               add_generation_prompt=True, tokenize=False)
    prompt = tinker.types.ModelInput.from_ints(tokenizer.encode(prompt_ids))
    greedy = tinker.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    out = sampler.sample(prompt, 2, greedy, include_prompt_logprobs=True).result()
    a, b = out.sequences
    assert a.tokens == b.tokens and len(a.tokens) == 6 and a.stop_reason == "length"
    # on-policy: the sampler's log-probs are the trainer's log-probs of the same tokens
    full = tinker.types.ModelInput.from_ints(prompt.to_ints() + a.tokens)
    logprobs = sampler.compute_logprobs(full).result()
    np.testing.assert_allclose(a.logprobs, logprobs[-6:], atol=1e-5)
    assert out.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], logprobs[1:prompt.length], atol=1e-5)
    # compute_logprobs equals forward_backward's log-probs for the same tokens
    datum = tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(full.to_ints()[:-1]),
                               loss_fn_inputs={"target_tokens": full.to_ints()[1:],
                                               "weights": [1.0] * (full.length - 1)})
    fb = client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(fb, logprobs[1:], atol=1e-5)
    # stops: a stop token ends the sample (and is kept), seeded sampling is reproducible
    stop_at = a.tokens[0]
    stopped = sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=6, temperature=0.0, stop=[stop_at])).result()
    assert stopped.sequences[0].tokens == [stop_at] and stopped.sequences[0].stop_reason == "stop"
    seeded = tinker.SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    first = [s.tokens for s in sampler.sample(prompt, 3, seeded).result().sequences]
    assert first == [s.tokens for s in sampler.sample(prompt, 3, seeded).result().sequences]
    base = service.create_sampling_client(base_model="tiny-qwen3-moe")
    base_tokens = base.sample(prompt, 1, greedy).result().sequences[0].tokens
    assert len(base_tokens) == 6 and all(0 <= t < 512 for t in base_tokens)  # slot 0: the base model


def test_custom_loss_applies_its_gradient(service):
    import torch

    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=4, seed=2)
    data = _sdk_datums(client.get_tokenizer(), 3)
    weights = [np.random.default_rng(i).normal(size=d.model_input.length).astype(np.float32)
               for i, d in enumerate(data)]
    trainer = client.engine.trainer

    def custom(data, logprobs):
        loss = sum(-(lp * torch.from_numpy(w)).sum() for lp, w in zip(logprobs, weights))
        return loss, {"custom_metric": 1.5}

    out = client.forward_backward_custom(data, custom).result()
    custom_grads = {p: np.asarray(g) for p, g in trainer.grads.items()}
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}
    weighted = [tinker.types.Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"], "weights": tinker.TensorData.from_numpy(w)})
        for d, w in zip(data, weights)]
    reference = client.forward_backward(weighted, "cross_entropy").result()
    assert out.metrics["custom_metric"] == 1.5
    assert out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    for p, g in trainer.grads.items():
        np.testing.assert_allclose(custom_grads[p], np.asarray(g), atol=1e-6, err_msg=str(p))
    assert any(np.abs(g).max() > 0 for g in custom_grads.values())
    trainer.grads = {p: g * 0 for p, g in trainer.grads.items()}


def test_clients_forward_backward_together_and_each_gets_its_own_result(service):
    """Requests of different clients queued together run as one batch (one program call) and each client gets
    exactly what it would have got alone; a bad request fails alone."""
    engine = service._engine("tiny-qwen3-moe")
    one = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=4, seed=3)
    two = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=8, seed=4)
    for client in (one, two):  # make the adapters differ from the base and from each other
        client.forward_backward(_sdk_datums(client.get_tokenizer(), 2), "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    data_one, data_two = _sdk_datums(one.get_tokenizer(), 3), _sdk_datums(two.get_tokenizer(), 5)[3:]
    alone = [one.forward(data_one, "cross_entropy").result(), two.forward(data_two, "cross_entropy").result()]

    bad = tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints([1, 2, 9999]),
                             loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    before = dict(engine.stats)
    gate = engine.submit(lambda: __import__("time").sleep(0.3))  # hold the worker so the requests queue up
    together = [one.forward(data_one, "cross_entropy"), two.forward([bad], "cross_entropy"),
                two.forward(data_two, "cross_entropy")]
    gate.result()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        together[1].result()
    together = [together[0].result(), together[2].result()]
    assert engine.stats["batches"] == before["batches"] + 1
    assert engine.stats["batched_requests"] == before["batched_requests"] + 2
    for a, b in zip(alone, together):
        assert len(a.loss_fn_outputs) == len(b.loss_fn_outputs)
        assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
            np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=2e-5)
    assert alone[0].metrics["loss:sum"] != alone[1].metrics["loss:sum"]


def test_sampler_weights_and_slots_return_to_the_pool(service):
    import gc

    engine = service._engine("tiny-qwen3-moe")
    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=4, seed=5)
    tokenizer = client.get_tokenizer()
    client.forward_backward(_sdk_datums(tokenizer, 2), "cross_entropy").result()
    client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    path = client.save_weights_for_sampler("s1").result().path
    assert path == f"tinker://{client.run_id}/sampler_weights/s1"
    with pytest.raises(ValueError, match="not a checkpoint path"):
        service.create_training_client_from_state(path)  # sampler weights hold no training state
    prompt = tinker.types.ModelInput.from_ints(tokenizer.encode("12 + 30 ="))
    expected = client.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    free = engine.free_slot_count
    for _ in range(2 * service.num_slots):  # far more snapshots than slots: each returns its slot when dropped
        sampler = service.create_sampling_client(model_path=path)
        np.testing.assert_allclose(sampler.compute_logprobs(prompt).result()[1:], expected[1:], atol=1e-6)
        del sampler
        gc.collect()
    assert engine.free_slot_count == free


def test_checkpoints_move_between_engines_of_different_max_rank(service, tmp_path):
    """A rank-4 adapter saved where the max rank is 16 loads where it is 8 (the rank axis is fitted), gives the
    same log-probs, and a rank-16 adapter is refused there with a one-line error."""
    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=4, seed=6)
    data = _sdk_datums(client.get_tokenizer(), 2)
    client.forward_backward(data, "cross_entropy").result()
    client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    path = client.save_state("rank4").result().path
    expected = client.forward(data, "cross_entropy").result().metrics["loss:sum"]
    other = tinker.ServiceClient(state_dir=service.state_dir, num_slots=3, max_rank=8)
    moved = other.create_training_client_from_state_with_optimizer(path)
    assert moved.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    big = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=16, seed=7)
    big.forward_backward(data, "cross_entropy").result()
    big.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    with pytest.raises(ValueError, match="checkpoint does not fit this model"):
        other.create_training_client_from_state(big.save_state("rank16").result().path)
