"""The OpenAI-compatible endpoint of `jtinker serve`, driven over real loopback HTTP by the official `openai`
client (and the official `tinker` SDK to make adapters). One server for the module, with API keys."""

import concurrent.futures
import json

import pytest

openai = pytest.importorskip("openai")
tinker = pytest.importorskip("tinker")
from tinker import types

KEY = "tml-oai-alice"
MODEL = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def server(tmp_path_factory, jax_cache_dir, jtinker_server):
    srv = jtinker_server([MODEL], tmp_path_factory.mktemp("oai-state"),
                         tmp_path_factory.mktemp("oai-log") / "server.log", api_keys=(KEY,), jax_cache=jax_cache_dir,
                         extra_args=("--slots", "8", "--max-lora-rank", "4"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from models.tokenizer import load_tokenizer

    return load_tokenizer("tiny-chatml")


def greedy(client, prompt, max_tokens=8, model=MODEL, stream=False):
    """The text of one greedy completion, streamed or not."""
    if not stream:
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_models_and_completions_match_the_tinker_sampler(server, client, tokenizer):
    assert MODEL in [m.id for m in client.models.list().data]
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL and choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(ids)
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the most likely
        assert len(top) <= 3 and token_lp <= 0 and max(top.values()) == pytest.approx(token_lp, abs=1e-5)
    # the same tokens as the Tinker protocol's sampler on the same server
    svc = server.sdk_client(KEY)
    sc = svc.create_sampling_client(base_model=MODEL).result()
    ref = sc.sample(types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=8, temperature=0.0)).result()
    ref_tokens = ref.sequences[0].tokens
    assert len(ref_tokens) == out.usage.completion_tokens
    assert choice.text == tokenizer.decode(ref_tokens, skip_special_tokens=True)
    # token ids as the prompt, n samples, seeds, and the /oai/api/v1 prefix
    oai = openai.OpenAI(base_url=server.url + "/oai/api/v1", api_key=KEY, max_retries=0)
    assert oai.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0).choices[0].text == choice.text
    many = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=7,
                                     logprobs=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert many.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in many.choices)
    # a stop string ends the text before it
    full = greedy(client, prompt, max_tokens=12)
    assert len(full) > 3
    stop = full[2:4]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_completions_use_the_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2)
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.content) == out.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5)
               for c in choice.logprobs.content)
    # the templated prompt as a plain completion gives the same text
    assert choice.message.content == client.completions.create(model=MODEL, prompt=ids, max_tokens=8,
                                                               temperature=0).choices[0].text


def test_streaming_gives_the_same_text(client):
    prompt = "Please answer the question."
    assert greedy(client, prompt, 10, stream=True) == greedy(client, prompt, 10)
    messages = [{"role": "user", "content": "Sort the list: [5, 3, 9, 1]"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_32_concurrent_requests_none_lost_or_mixed_up(client):
    prompts = [f"Numbers: {' '.join(str(j) for j in range(i % 7, i % 7 + 1 + i // 7))} and {i}" for i in range(32)]
    assert len(set(prompts)) == 32
    alone = [greedy(client, p, 6) for p in prompts]
    assert len(set(alone)) > 1
    with concurrent.futures.ThreadPoolExecutor(32) as pool:  # half streamed, half not, all at once
        together = list(pool.map(lambda ip: greedy(client, ip[1], 6, stream=ip[0] % 2 == 1), enumerate(prompts)))
    assert together == alone


def _trained_adapter(svc, tokenizer, text: str, name: str) -> str:
    tc = svc.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    ids = tokenizer.encode(text, add_special_tokens=False)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    for _ in range(3):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    return tc.save_weights_for_sampler(name).result().path


def test_two_adapters_in_one_batch_each_give_their_own_result(server, client, tokenizer):
    svc = server.sdk_client(KEY)
    a = _trained_adapter(svc, tokenizer, "The sea is wide and blue, the waves come in and out. " * 3, "oai-a")
    b = _trained_adapter(svc, tokenizer, "Yes. No. Maybe. True. False. It is correct. " * 3, "oai-b")
    assert a.startswith("tinker://") and "/sampler_weights/" in a
    prompts = ["The quick brown", "When we sort numbers", "Hello! How are", "What is the capital"]
    jobs = [(model, p) for p in prompts for model in (a, b)]
    alone = {job: greedy(client, job[1], 8, model=job[0]) for job in jobs}
    base = {p: greedy(client, p, 8) for p in prompts}
    assert any(alone[(a, p)] != alone[(b, p)] for p in prompts)  # the adapters differ ...
    assert any(alone[(a, p)] != base[p] for p in prompts)  # ... and are not the base model
    with concurrent.futures.ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(lambda ij: greedy(client, ij[1][1], 8, model=ij[1][0], stream=ij[0] % 2 == 0),
                                 enumerate(jobs * 2)))
    assert together == [alone[job] for job in jobs * 2]
    chat = client.chat.completions.create(model=b, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0)
    assert chat.model == b and chat.choices[0].message.content is not None


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, client):
    import httpx

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tinker://nobody:train:0/sampler_weights/x", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[5] * 5000, max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert err.value.body["param"] == "max_tokens"
    raw = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "tiny', timeout=30,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400
    body = raw.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.usage.completion_tokens >= 1 and json.loads(out.model_dump_json())["choices"][0]["message"]
