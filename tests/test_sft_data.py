"""The Grain SFT pipeline: JSONL conversations -> chat template -> Datums with assistant-only weights -> batches."""

import json

import numpy as np
import pytest

from jtinker.sft import conversation_datum
from jtinker.sft_data import DataError, conversation_dataset, packed_batches, padded_batches, trained_tokens
from jtinker.trainer import MIN_TOKENS_BUCKET
from models.checks import pow2_bucket
from models.tokenizer import load_tokenizer


def _conversations(n):
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": f"{i} + {i} = {2 * i}." + " Indeed." * (i % 4)}]
        if i % 3 == 0:  # multi-turn with a system prompt
            messages = [{"role": "system", "content": "Be brief."}] + messages + [
                {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": f"{4 * i}."}]
        out.append(messages)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = _conversations(11)
    with open(path, "w") as f:
        for i, messages in enumerate(rows):
            f.write(json.dumps({"messages": messages} if i % 2 else messages) + "\n")
            if i == 4:
                f.write("\n")  # blank lines are skipped
    return path, rows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-chatml")


def _key(datum):
    return tuple(datum.tokens.tolist())


def test_every_conversation_once_per_epoch_with_assistant_only_weights(data_file, tokenizer):
    path, rows = data_file
    expected = {_key(conversation_datum(tokenizer, m)): conversation_datum(tokenizer, m) for m in rows}
    seen = list(conversation_dataset(path, tokenizer, seed=3, num_epochs=2))
    assert len(seen) == 2 * len(rows)
    first, second = seen[:len(rows)], seen[len(rows):]
    assert sorted(map(_key, first)) == sorted(expected) == sorted(map(_key, second))
    assert [_key(d) for d in first] != [_key(d) for d in second]  # reshuffled each epoch
    for d in seen:
        ref = expected[_key(d)]
        np.testing.assert_array_equal(d.loss_fn_inputs["weights"], ref.loss_fn_inputs["weights"])
        np.testing.assert_array_equal(d.loss_fn_inputs["target_tokens"], ref.loss_fn_inputs["target_tokens"])
    # the weights sit exactly on the assistant replies: decoding the weighted targets gives them back
    d = expected[_key(conversation_datum(tokenizer, rows[3]))]
    text = tokenizer.decode(d.loss_fn_inputs["target_tokens"][d.loss_fn_inputs["weights"] > 0].tolist())
    assert "3 + 3 = 6." in text and "12." in text and "What is" not in text and "Be brief" not in text
    # the same seed gives the same order; another seed another
    again = [_key(d) for d in conversation_dataset(path, tokenizer, seed=3)]
    assert again == [_key(d) for d in first]
    assert again != [_key(d) for d in conversation_dataset(path, tokenizer, seed=4)]


def test_padded_and_packed_batches(data_file, tokenizer):
    path, rows = data_file
    ds = conversation_dataset(path, tokenizer, seed=0)
    padded = list(padded_batches(ds, 4))
    assert [len(b) for b in padded] == [4, 4, 3]
    budget = 128
    packed = list(packed_batches(ds, budget))
    assert sorted(_key(d) for b in packed for d in b) == sorted(_key(d) for b in padded for d in b)
    for b in packed:
        cost = pow2_bucket(len(b)) * max(pow2_bucket(len(d.tokens), MIN_TOKENS_BUCKET) for d in b)
        assert cost <= budget or len(b) == 1
    assert len(packed) < len(rows)  # short conversations share batches
    assert sum(trained_tokens(b) for b in packed) == sum(trained_tokens(b) for b in padded) > 0
    cut = list(conversation_dataset(path, tokenizer, max_length=20))
    assert max(len(d.tokens) for d in cut) == 20
    assert all(len(d.loss_fn_inputs["weights"]) == len(d.tokens) for d in cut)


def test_the_iterator_resumes_where_it_stopped(data_file, tokenizer):
    path, _ = data_file
    ds = conversation_dataset(path, tokenizer, seed=1)
    full = [[_key(d) for d in b] for b in padded_batches(ds, 3)]
    it = padded_batches(ds, 3)
    next(it)
    state = it.get_state()
    resumed = padded_batches(ds, 3)
    resumed.set_state(state)
    assert [[_key(d) for d in b] for b in resumed] == full[1:]


@pytest.mark.parametrize("line,message", [
    ("{not json", "conversation 2: not valid JSON"),
    ('{"messages": [{"role": "user"}]}', "message 0 needs string 'role' and 'content'"),
    ('[{"role": "user", "content": "hi"}]', "no assistant message"),
    ('{"text": "hello"}', "expected"),
])
def test_malformed_lines_name_the_line_and_the_problem(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_conversations(1)[0])
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        list(conversation_dataset(path, tokenizer, shuffle=False))
    with pytest.raises(DataError, match="no such file"):
        conversation_dataset(tmp_path / "missing.jsonl", tokenizer)
