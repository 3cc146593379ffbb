"""The Tinker operations both front ends run on a `ModelEngine`: the in-process clients (`jtinker.client`) and the
REST server (`jtinker.server`). Keeping them here means the two can never disagree about what a fresh adapter
is, where a checkpoint lives, which names are allowed or how a stop list is read.

Functions taking an `engine` touch its trainer, so they run on the engine's worker (`engine.submit(fn, ...)`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

LORA_ALPHA = 32.0  # Tinker's alpha, for every rank
NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # checkpoint names (one path segment, no escaping)
RUN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")  # run ids; the server's are `{session}:train:{n}`
KINDS = ("weights", "sampler_weights")


def check_name(name: str) -> str:
    """A checkpoint name, or a one-line ValueError (names are single path segments: they cannot escape)."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise ValueError(f"checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return name


def parse_tinker_path(path: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, str, str]:
    """`tinker://{run}/{kind}/{name}` -> (run, kind, name), or a one-line ValueError."""
    match = re.fullmatch(r"tinker://([^/]+)/([a-z_]+)/([^/]+)", path or "")
    expected = " or ".join(f"tinker://RUN/{kind}/NAME" for kind in kinds)
    if (not match or match.group(2) not in kinds or not RUN_ID.match(match.group(1))
            or match.group(1) in (".", "..") or not NAME.match(match.group(3)) or match.group(3) in (".", "..")):
        raise ValueError(f"not a checkpoint path: {path!r} (expected {expected})")
    return match.group(1), match.group(2), match.group(3)


def checkpoint_folder(state_dir: Path, path: str, kinds: tuple[str, ...] = KINDS) -> Path:
    """The existing folder of a `tinker://` checkpoint path inside `state_dir`."""
    run, kind, name = parse_tinker_path(path, kinds)
    folder = Path(state_dir) / run / kind / name
    if not (folder / "state").is_dir():
        raise FileNotFoundError(f"no saved checkpoint at {path}")
    return folder


def read_meta(folder: Path) -> dict:
    """A checkpoint's `meta.json`: base_model, rank and (when known) the LoRA targets."""
    return json.loads((Path(folder) / "meta.json").read_text())


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def new_adapter(engine, slot: int, *, rank: int, seed: int | None, train_attn: bool = True, train_mlp: bool = True,
                train_unembed: bool = True) -> None:
    """`slot` becomes a fresh adapter (B = 0: an exact no-op) with fresh optimizer state. Engine worker only."""
    from models.lora import init_adapter_slot

    if not 1 <= rank <= engine.lora.max_rank:
        raise ValueError(f"LoRA rank must be in [1, {engine.lora.max_rank}] for {engine.base_model!r}, got {rank}")
    model = engine.trainer.model()
    init_adapter_slot(model, slot, rank=rank, alpha=LORA_ALPHA, seed=0 if seed is None else seed,
                      train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed)
    engine.trainer.reset_from(model, slot)


def save_checkpoint(engine, slot: int, folder: Path, *, with_optimizer: bool, meta: dict) -> int:
    """Write `slot` (and its optimizer state) to `folder/state` plus `folder/meta.json`; returns the size in bytes.
    meta.json is written last, so a folder with it is complete. Engine worker only."""
    from jtinker.checkpoints import save_state

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    save_state(engine.trainer, slot, folder / "state", with_optimizer=with_optimizer)
    (folder / "meta.json").write_text(json.dumps({"base_model": engine.base_model, **meta}))
    return folder_size(folder)


def load_checkpoint(engine, slot: int, folder: Path, with_optimizer: bool) -> None:
    """Load a checkpoint folder into `slot`. Engine worker only."""
    from jtinker.checkpoints import load_state

    load_state(engine.trainer, slot, Path(folder) / "state", with_optimizer)


def save_snapshot(engine, slot: int, file: Path) -> None:
    """The adapter of `slot` (no optimizer state) as one .npz file: the fast path for the sampler snapshots RL
    takes every step. Engine worker only."""
    from jtinker.checkpoints import slot_state

    state = slot_state(engine.trainer, slot, with_optimizer=False)
    flat = {f"{group}|{key}": value for group, values in state.items() for key, value in values.items()}
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(file)


def load_snapshot(engine, slot: int, file: Path) -> None:
    from jtinker.checkpoints import set_slot_state

    state: dict = {}
    with np.load(file) as data:
        for flat in data.files:
            group, key = flat.split("|", 1)
            state.setdefault(group, {})[key] = data[flat]
    set_slot_state(engine.trainer, slot, state, with_optimizer=False)


def stop_conditions(eos_token_id, stop) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Tinker's `stop`: None stops at the end-of-sequence token; a string or a list of strings or ints replaces
    it ([] disables stopping). Returns (stop token ids, stop strings)."""
    if stop is None:
        eos = eos_token_id
        return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]), ()
    if isinstance(stop, str):
        return (), (stop,)
    stop = list(stop)
    if all(isinstance(s, int) for s in stop):
        return tuple(stop), ()
    return (), tuple(str(s) for s in stop)


def sample(engine, slot: int, tokens: list[int], num_samples: int, *, max_tokens: int, temperature: float = 1.0,
           top_k: int = -1, top_p: float = 1.0, seed: int | None = None, stop=None,
           prompt_logprobs: bool = False, prompt_logprobs_last_n: int | None = None):
    """Samples of one prompt with `slot`'s adapter: ([(tokens, logprobs, stop_reason)], prompt log-probs or None).
    Prompt log-probs have None at position 0 (and before the last `prompt_logprobs_last_n`). Engine worker only."""
    from models.tokenizer import load_tokenizer

    if num_samples is None or num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    stop_ids, stop_strings = stop_conditions(engine.model.config.eos_token_id, stop)
    tokenizer = load_tokenizer(engine.tokenizer_spec) if stop_strings else None
    samples = engine.sampler.sample(
        list(tokens), slot, num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop_token_ids=stop_ids, stop_strings=stop_strings,
        decode=tokenizer.decode if tokenizer else None)
    prompt_lp = None
    if prompt_logprobs:
        prompt_lp = engine.sampler.prompt_logprobs(list(tokens), slot)
        if prompt_logprobs_last_n is not None:
            n = len(prompt_lp)
            if not 1 <= prompt_logprobs_last_n <= n - 1:
                raise ValueError(f"prompt_logprobs_last_n must be in [1, {n - 1}] for a prompt of {n} tokens, "
                                 f"got {prompt_logprobs_last_n}")
            prompt_lp = [None] * (n - prompt_logprobs_last_n) + prompt_lp[n - prompt_logprobs_last_n:]
    return samples, prompt_lp
