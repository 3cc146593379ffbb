"""The sampling engine and continuous-batching scheduler (serving/): decoding from the grouped-query and latent
caches equals the training forward, batching changes nothing, adapters and seeds are per request."""

import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_deepseek_config, tiny_hf_config, tiny_vl_config
from jtinker.trainer import Datum, Trainer
from models.config import config_from_hf_dict
from models.lora import LoraConfig, LoRAParam, LoRAScale, slot_axes
from models.registry import create_model
from serving.engine import Engine
from serving.scheduler import Request, SamplingParams, Scheduler, SchedulerUnavailable

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def randomize_adapters(model, slots, seed: int = 0) -> None:
    """Trained-looking adapters in `slots`: random A and non-zero B (rank 4, scale 2), so each slot really changes
    the outputs. Drawn with numpy on the host: no compile per tensor shape."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Any(LoRAParam, LoRAScale))
    flat = {}
    axes = slot_axes(model)
    for path, var in nnx.to_flat_state(state):
        a = np.array(var.get_value())
        for slot in slots:
            index = (slice(None),) * axes[path] + (slot,)
            if path[-1] == "lora_scale":
                a[index] = 2.0
            else:
                std = 0.3 if path[-1] == "lora_b" else a.shape[-2] ** -0.5
                a[index] = std * rng.standard_normal(a[index].shape)
        flat[path] = var.replace(jnp.asarray(a))
    nnx.update(model, nnx.from_flat_state(flat))


def build(hf_config: dict):
    cfg = config_from_hf_dict(hf_config)
    model = create_model(cfg, dtype="float32", lora=LoraConfig(num_slots=3, max_rank=4))
    randomize_adapters(model, (1, 2))
    return model


@pytest.fixture(scope="module")
def qwen():
    model = build(tiny_hf_config())
    return model, Engine(model, num_slots=4, max_len=64, max_prefill_batch=4, num_top_logprobs=4)


@pytest.fixture(scope="module")
def kimi():
    model = build(tiny_deepseek_config())
    return model, Engine(model, num_slots=4, max_len=64, max_prefill_batch=4, num_top_logprobs=4)


PROMPTS = [list(np.random.default_rng(i).integers(0, 96, n)) for i, n in enumerate((5, 11, 3, 8, 13, 7))]


@jax.jit
def _forward(model, ids, adapter):
    return jax.nn.log_softmax(model(ids, adapter_ids_B=adapter)[0].astype(jnp.float32), axis=-1)


def full_forward_logprobs(model, tokens, adapter):
    """log-softmax of the whole-sequence training forward (no cache) at every position [T, V]; right padding
    to one length (causal: it changes nothing before it) keeps this to one compile per model."""
    ids = np.zeros((1, 64), np.int32)
    ids[0, :len(tokens)] = tokens
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray([adapter], jnp.int32)))[:len(tokens)]


def staggered(scheduler, requests, arrivals):
    """Submit request i before round arrivals[i] (rounds are admit + one decode chunk), then drain."""
    futures = [None] * len(requests)
    for round_ in range(max(arrivals) + 1):
        for i, at in enumerate(arrivals):
            if at == round_:
                futures[i] = scheduler.submit(requests[i])
        scheduler.step()
    scheduler.run_until_idle()
    return [f.result(timeout=0) for f in futures]


@pytest.mark.parametrize("family", ["qwen", "kimi"])
def test_continuous_batching_equals_one_at_a_time_and_the_training_forward(family, request):
    model, engine = request.getfixturevalue(family)
    adapters = [0, 1, 2, 1, 0, 2]
    lengths = [10, 6, 12, 9, 8, 11]
    requests = [Request(PROMPTS[i], SamplingParams(max_tokens=lengths[i], temperature=0.0), adapter=adapters[i])
                for i in range(len(PROMPTS))]
    scheduler = Scheduler(engine, chunk=4)
    # six requests on four slots, arriving in three waves: later ones join while others decode, the last
    # ones wait for a slot to free up
    together = staggered(scheduler, requests, arrivals=[0, 0, 1, 2, 2, 2])
    alone = [staggered(scheduler, [r], [0])[0] for r in requests]
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a.samples[0].tokens == b.samples[0].tokens, i
        np.testing.assert_allclose(a.samples[0].logprobs, b.samples[0].logprobs, atol=1e-5)
        assert len(a.samples[0].tokens) == lengths[i] and a.samples[0].stop_reason == "length"
        # the independent reference: a whole-sequence forward over prompt + sample, without any cache
        full = PROMPTS[i] + a.samples[0].tokens
        logprobs = full_forward_logprobs(model, full, adapters[i])[len(PROMPTS[i]) - 1:-1]
        assert list(logprobs.argmax(-1)) == a.samples[0].tokens
        picked = np.take_along_axis(logprobs, np.asarray(a.samples[0].tokens)[:, None], -1)[:, 0]
        np.testing.assert_allclose(a.samples[0].logprobs, picked, atol=1e-4)
    # the adapters matter, so the above could fail: the same prompt under another adapter decodes differently
    other = staggered(scheduler, [Request(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0.0), adapter=0)],
                      [0])[0]
    assert other.samples[0].tokens != together[1].samples[0].tokens
    # shapes are bucketed: running the same traffic again compiles nothing new
    compiles = engine.compile_count
    again = staggered(scheduler, requests, arrivals=[0, 0, 1, 2, 2, 2])
    assert [r.samples[0].tokens for r in again] == [r.samples[0].tokens for r in together]
    assert engine.compile_count == compiles
    assert set(engine.compiles) == {"prefill", "insert", "generate"}


def test_two_adapters_in_one_batch_each_give_their_own_result(qwen):
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4)
    prompt = PROMPTS[3]
    requests = [Request(prompt, GREEDY, adapter=a) for a in (1, 2)]
    both = staggered(scheduler, requests, [0, 0])
    alone = [staggered(scheduler, [r], [0])[0] for r in requests]
    assert [r.samples[0].tokens for r in both] == [r.samples[0].tokens for r in alone]
    assert both[0].samples[0].tokens != both[1].samples[0].tokens


def test_sampled_and_prompt_logprobs_equal_the_training_forward(qwen):
    model, engine = qwen
    scheduler = Scheduler(engine, chunk=4)
    params = SamplingParams(max_tokens=9, temperature=1.0, seed=3)
    result = staggered(scheduler, [Request(PROMPTS[4], params, num_samples=2, adapter=1, prompt_logprobs=True)],
                       [0])[0]
    trainer = Trainer(model)
    for sample in result.samples:
        full = PROMPTS[4] + sample.tokens
        datum = Datum(np.asarray(full[:-1]), {"target_tokens": np.asarray(full[1:]),
                                              "weights": np.ones(len(full) - 1, np.float32)})
        trained = trainer.forward_backward([datum], [1], "cross_entropy", backward=False).logprobs[0]
        np.testing.assert_allclose(sample.logprobs, trained[len(PROMPTS[4]) - 1:], atol=1e-4)
        assert result.prompt_logprobs[0] is None
        np.testing.assert_allclose(result.prompt_logprobs[1:], trained[:len(PROMPTS[4]) - 1], atol=1e-4)
    assert result.samples[0].tokens != result.samples[1].tokens  # two samples, two keys


def test_seeded_sampling_is_reproducible_in_any_batch(qwen):
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    alone = staggered(scheduler, [Request(PROMPTS[0], params, num_samples=2, adapter=2)], [0])[0]
    crowd = [Request(PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, seed=5)),
             Request(PROMPTS[0], params, num_samples=2, adapter=2)]
    batched = staggered(scheduler, crowd, [0, 1])[1]  # other slots, another batch, joining mid-flight
    assert [s.tokens for s in batched.samples] == [s.tokens for s in alone.samples]
    np.testing.assert_allclose(batched.samples[0].logprobs, alone.samples[0].logprobs, atol=1e-5)
    reseeded = staggered(scheduler, [Request(PROMPTS[0], SamplingParams(
        max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, seed=12), num_samples=2, adapter=2)], [0])[0]
    assert [s.tokens for s in reseeded.samples] != [s.tokens for s in alone.samples]


def test_truncation_top_logprobs_and_temperature(qwen):
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4)
    greedy = staggered(scheduler, [Request(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0,
                                                                      top_logprobs=3))], [0])[0].samples[0]
    for params in (SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=1),
                   SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=2)):
        sample = staggered(scheduler, [Request(PROMPTS[2], params)], [0])[0].samples[0]
        assert sample.tokens == greedy.tokens  # only the most likely token survives truncation
        np.testing.assert_allclose(sample.logprobs, greedy.logprobs, atol=1e-5)  # log-probs before truncation
    for position, top in zip(range(8), greedy.top_logprobs):
        assert len(top) == 3 and top[0][0] == greedy.tokens[position]
        assert top[0][1] == pytest.approx(greedy.logprobs[position], abs=1e-6)
        assert top[0][1] >= top[1][1] >= top[2][1]
    hot = staggered(scheduler, [Request(PROMPTS[2], SamplingParams(max_tokens=8, temperature=2.0, seed=4))],
                    [0])[0].samples[0]
    # log-probs are those of the distribution sampled from: flatter at temperature 2
    assert np.mean(hot.logprobs) < np.mean(greedy.logprobs)


def test_stop_tokens_stop_strings_and_lengths(qwen):
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4, decode=lambda tokens: "".join(chr(65 + t % 26) for t in tokens))
    prompt = PROMPTS[5]
    reference = staggered(scheduler, [Request(prompt, SamplingParams(max_tokens=12, temperature=0.0),
                                              adapter=1)], [0])[0].samples[0].tokens
    stop_token = reference[5]
    first = reference.index(stop_token)
    out = staggered(scheduler, [Request(prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                               stop_token_ids=(stop_token,)), adapter=1)], [0])[0]
    assert out.samples[0].tokens == reference[:first + 1] and out.samples[0].stop_reason == "stop"
    text = "".join(chr(65 + t % 26) for t in reference)
    stop = text[6:8]
    end = min(m for m in range(1, 13) if stop in text[:m])
    out = staggered(scheduler, [Request(prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_strings=(stop,)),
                                        adapter=1)], [0])[0]
    assert out.samples[0].tokens == reference[:end] and out.samples[0].stop_reason == "stop"
    short = staggered(scheduler, [Request(prompt, SamplingParams(max_tokens=1, temperature=0.0), adapter=1)],
                      [0])[0]
    assert short.samples[0].tokens == reference[:1] and short.samples[0].stop_reason == "length"
    scheduler.start()  # streaming, with the loop in its own thread
    try:
        future, tokens = scheduler.stream(Request(prompt, SamplingParams(max_tokens=12, temperature=0.0),
                                                  adapter=1, num_samples=2))
        streamed = list(tokens)
        assert [t for i, t, _ in streamed if i == 1] == reference == future.result().samples[1].tokens
        assert len(streamed) == 24
    finally:
        scheduler.close()
    long = scheduler.submit(Request(prompt, SamplingParams(max_tokens=40, temperature=0.0), num_samples=3,
                                    adapter=1))
    waiting = scheduler.submit(Request(prompt, SamplingParams(max_tokens=4, temperature=0.0), num_samples=2,
                                       adapter=1))
    scheduler.step()
    assert scheduler.busy_slots == 3  # the second request waits for two free slots
    scheduler.cancel(long)  # e.g. the client went away: its slots free up, the waiting request goes on
    scheduler.run_until_idle()
    assert long.cancelled() and waiting.result(timeout=0).samples[1].tokens == reference[:4]
    assert scheduler.busy_slots == 0
    with pytest.raises(ValueError, match=r"token id 400 is outside the vocabulary \[0, "):
        scheduler.submit(Request([5, 400], GREEDY)).result(timeout=0)
    with pytest.raises(ValueError, match="num_samples"):
        scheduler.submit(Request(prompt, GREEDY, num_samples=5)).result(timeout=0)


def test_new_adapter_weights_apply_mid_flight_without_recompiling(qwen):
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4).start()
    original = engine.lora
    try:
        request = Request(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0.0), adapter=1)
        before = scheduler.submit(request).result(timeout=300).samples[0].tokens
        compiles = engine.compile_count
        streamed, started = [], threading.Event()

        def on_token(i, token, logprob):
            streamed.append(token)
            if len(streamed) == 4:
                started.set()

        in_flight = scheduler.submit(Request(PROMPTS[1], request.params, adapter=1, on_token=on_token))
        assert started.wait(timeout=300)
        changed = {p: (a.at[..., 1, :, :].multiply(-1.0) if p[-1] == "lora_b" and a.ndim == 4 else
                       a.at[1].multiply(-1.0) if p[-1] == "lora_b" and a.ndim == 3 else a)
                   for p, a in original.items()}
        engine.update_lora(changed)  # the trainer's new weights, while that request decodes
        finished = in_flight.result(timeout=300).samples[0].tokens
        after = scheduler.submit(request).result(timeout=300).samples[0].tokens
        assert engine.compile_count == compiles  # weights are arguments: nothing recompiled
        assert streamed == finished and finished[:4] == before[:4]
        assert after != before  # the new weights took effect
        reference = list(full_forward_logprobs(_merged(engine, changed), PROMPTS[1] + after, 1)
                         [len(PROMPTS[1]) - 1:-1].argmax(-1))
        assert after == reference
        with pytest.raises(ValueError, match="update_lora"):
            engine.update_lora({p: a.astype(jnp.bfloat16) for p, a in changed.items()})
    finally:
        scheduler.close()
        engine.update_lora(original)


def _merged(engine, lora):
    """The model with these LoRA arrays (as the engine merges them inside its programs)."""
    state = nnx.from_flat_state({p: v.replace(lora[p]) for p, v in nnx.to_flat_state(engine._lora_template)})
    return nnx.merge(engine.graphdef, state, engine.base)


@functools.partial(jax.jit, static_argnames=("image_grid_thw",))
def _vl_logits(model, ids, mask, positions, pixel_values, image_grid_thw):
    h, _ = model.hidden_states(ids, attention_mask_BT=mask, positions_BT=positions, pixel_values=pixel_values,
                               image_grid_thw=image_grid_thw)
    return model.logits(h)


def test_vision_language_model_decodes_text_and_image_prompts():
    from jtinker.compare_torch import sample_images
    from models.image_processing import ImageProcessorConfig, num_image_tokens, preprocess_images
    from models.qwen3_vl_moe import mrope_positions

    hf = tiny_vl_config(num_hidden_layers=2)
    hf["vision_config"].update(depth=2, deepstack_visual_indexes=[0])  # small: building it is most of the test
    cfg = config_from_hf_dict(hf)
    model = create_model(cfg, dtype="float32", lora=LoraConfig(num_slots=2, max_rank=4))
    engine = Engine(model, num_slots=2, max_len=32, max_prefill_batch=2)
    scheduler = Scheduler(engine, chunk=4)
    pixels, grids = preprocess_images([sample_images(1)[0][:64, :96]], ImageProcessorConfig(min_pixels=64 * 64))
    grid = tuple(int(v) for v in grids[0])
    image_prompt = PROMPTS[2] + [cfg.vision_start_token_id] + [cfg.image_token_id] * num_image_tokens(grid, 2) + [
        cfg.vision_end_token_id, 7]
    prompts = [PROMPTS[0], image_prompt, PROMPTS[3]]
    images = [None, (pixels, (grid,)), None]
    requests = [Request(p, SamplingParams(max_tokens=8, temperature=0.0), images=i) for p, i in zip(prompts, images)]
    results = staggered(scheduler, requests, [0, 0, 1])
    for prompt, image, result in zip(prompts, images, results):
        tokens = prompt + result.samples[0].tokens
        ids, mask = np.zeros((1, 32), np.int64), np.zeros((1, 32), np.int64)  # one padded length: one compile
        ids[0, :len(tokens)], mask[0, :len(tokens)] = tokens, 1
        # the reference: the whole sequence at once, M-RoPE positions from the token types (text after the
        # image continues after its largest position)
        positions = mrope_positions(ids, mask, [] if image is None else image[1], cfg)
        logits = np.asarray(_vl_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions),
                                       None if image is None else jnp.asarray(image[0]),
                                       image_grid_thw=None if image is None else image[1]))
        assert list(logits[0, len(prompt) - 1:len(tokens) - 1].argmax(-1)) == result.samples[0].tokens
    other, _ = preprocess_images([sample_images(1, seed=3)[0][:64, :96]], ImageProcessorConfig(min_pixels=64 * 64))
    other_image = staggered(scheduler, [Request(image_prompt, requests[1].params, images=(other, (grid,)))], [0])[0]
    # the pixels reach the model
    assert np.abs(np.subtract(other_image.samples[0].logprobs, results[1].samples[0].logprobs)).max() > 1e-2


def test_bad_seeds_are_refused_before_they_take_a_slot_and_every_seed_has_its_own_stream(qwen):
    """Issue 18.1: seed 2**63 (or a float, a string, 2**80) once raised inside a round after taking decode slots,
    which were never given back; after as many such requests as slots, every request waited forever."""
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4)
    prompt = PROMPTS[0]
    for seed in (2**64, 2**80, -2**63 - 1, 1.5, "7", True):
        for _ in range(engine.num_slots):
            with pytest.raises(ValueError, match="seed"):
                scheduler.submit(Request(prompt, SamplingParams(max_tokens=4, seed=seed))).result(timeout=0)
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=1e-30),
                dict(top_p=float("nan")), dict(top_p=0.0), dict(max_tokens=1.5), dict(stop_token_ids=(10**6,))):
        with pytest.raises(ValueError):
            scheduler.submit(Request(prompt, dataclasses.replace(GREEDY, **bad))).result(timeout=0)
    assert scheduler.health() is None and scheduler.busy_slots == 0
    wide = [SamplingParams(max_tokens=4, temperature=1.0, seed=seed) for seed in (2**63, 2**64 - 1, 2**63 + 1)]
    results = staggered(scheduler, [Request(prompt, p, num_samples=engine.num_slots) for p in wide], [0, 0, 0])
    assert all(len(r.samples) == engine.num_slots for r in results)  # every slot, three times over
    assert results[0].samples[0].tokens != results[2].samples[0].tokens  # seeds differing in the low bit differ
    again = staggered(scheduler, [Request(prompt, wide[0], num_samples=engine.num_slots)], [0])[0]
    assert [s.tokens for s in again.samples] == [s.tokens for s in results[0].samples]


def test_a_failed_insert_gives_its_slots_back_and_health_reports_lost_slots_and_stalls(qwen, monkeypatch):
    _, engine = qwen
    scheduler = Scheduler(engine, chunk=4, stall_seconds=30)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "insert", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device fault")))
        failed = scheduler.submit(Request(PROMPTS[1], GREEDY, num_samples=engine.num_slots))
        scheduler.run_until_idle()
    with pytest.raises(RuntimeError, match="device fault"):
        failed.result(timeout=0)
    assert scheduler.health() is None and scheduler.busy_slots == 0
    whole = scheduler.submit(Request(PROMPTS[1], GREEDY, num_samples=engine.num_slots))
    scheduler.run_until_idle()
    assert len(whole.result(timeout=0).samples) == engine.num_slots
    scheduler._round_started = time.monotonic() - 31  # a round that never ends (a hung device call)
    queued = scheduler.submit(Request(PROMPTS[1], GREEDY))
    assert "30 s" in scheduler.health() and isinstance(queued.exception(timeout=0), SchedulerUnavailable)
    scheduler._round_started = None
    queued = scheduler.submit(Request(PROMPTS[1], GREEDY))
    assert scheduler.fail_if_stalled() is None and not queued.done()  # healthy again: nothing failed
    scheduler.run_until_idle()
    scheduler._free.pop()  # a slot the accounting lost: the head of a full-width queue would wait forever
    assert "1 decode slot(s)" in scheduler.health()
    refused = scheduler.submit(Request(PROMPTS[1], GREEDY))
    with pytest.raises(SchedulerUnavailable, match="lost"):
        refused.result(timeout=0)
