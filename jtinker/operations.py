"""The Tinker operations both front ends run on a `ModelEngine`: the in-process clients (`jtinker.client`) and the
REST server (`jtinker.server`). Keeping them here means the two can never disagree about what a fresh adapter
is, where a checkpoint lives, which names are allowed or how a stop list is read.

Functions taking an `engine` touch its trainer, so they run on the engine's worker (`engine.submit(fn, ...)`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

LORA_ALPHA = 32.0  # Tinker's alpha, for every rank
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # checkpoint names: one path segment, not hidden
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")  # run ids; the server's are `{session}:train:{n}`
KINDS = ("weights", "sampler_weights")


def check_name(name: str) -> str:
    """A checkpoint name, or a one-line ValueError (names are single path segments: they cannot escape)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:77] + "...")
        raise ValueError(f"checkpoint name {shown}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return name


def parse_tinker_path(path: str, kinds: tuple[str, ...] = KINDS) -> tuple[str, str, str]:
    """`tinker://{run}/{kind}/{name}` -> (run, kind, name), or a one-line ValueError."""
    match = re.fullmatch(r"tinker://([^/]+)/([a-z_]+)/([^/]+)", path or "")
    expected = " or ".join(f"tinker://RUN/{kind}/NAME" for kind in kinds)
    if (not match or match.group(2) not in kinds or not RUN_ID.fullmatch(match.group(1))
            or not NAME.fullmatch(match.group(3))):
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
    """Save `slot` to `folder` atomically (see `write_checkpoint`, `install_checkpoint`); returns the size in
    bytes. For callers without a commit of their own (the in-process clients). Engine worker only."""
    staging, size = write_checkpoint(engine, slot, folder, with_optimizer=with_optimizer, meta=meta,
                                     save_id=uuid.uuid4().hex)
    old = install_checkpoint(staging, folder)
    if old is not None:
        remove_tree(old)
    return size


def write_checkpoint(engine, slot: int, folder: Path, *, with_optimizer: bool, meta: dict,
                     save_id: str) -> tuple[Path, int]:
    """Write `slot` (and its optimizer state) beside `folder`, as the hidden `.NAME.partial-SAVE_ID` (its `state/`
    plus `meta.json` holding `save_id`), everything fsynced; returns (that folder, its size). Nothing at `folder`
    changes: a crash now leaves the old checkpoint as it was. Engine worker only."""
    from jtinker.checkpoints import save_state

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial-{save_id}"
    remove_tree(staging)
    staging.mkdir()
    save_state(engine.trainer, slot, staging / "state", with_optimizer=with_optimizer)
    (staging / "meta.json").write_text(json.dumps({"base_model": engine.base_model, **meta, "save_id": save_id}))
    _fsync_tree(staging)
    return staging, folder_size(staging)


def install_checkpoint(staging: Path, folder: Path) -> Path | None:
    """Put a written checkpoint in place by renames: an existing one moves aside to `.NAME.old-SAVE_ID`
    (returned: the caller removes it once the save is committed), then `staging` becomes `folder`. A crash
    between the two renames leaves no `folder` but a complete old one, which `recover_checkpoints` restores."""
    folder, staging = Path(folder), Path(staging)
    save_id = staging.name.rsplit("-", 1)[-1]
    old = None
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{save_id}"
        folder.rename(old)
    staging.rename(folder)
    _fsync(folder.parent)
    return old


def remove_tree(path: Path) -> None:
    """Delete a checkpoint folder so that no crash leaves a half-deleted one under its name: rename it to a
    hidden `.NAME.deleted-ID` first (what `recover_checkpoints` removes), then delete that."""
    import shutil

    path = Path(path)
    if not path.exists():
        return
    doomed = path.parent / f".{path.name.lstrip('.')}.deleted-{uuid.uuid4().hex[:12]}"
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_LEFTOVER = re.compile(r"\.(.+)\.(partial|old|deleted)-([0-9a-f]+)")


def recover_checkpoints(state_dir: Path, committed_save_id) -> dict:
    """At start-up, finish what a crash interrupted in `state_dir/RUN/KIND/`: partial writes are deleted; an
    overwrite whose new checkpoint was not committed is rolled back to the old one; a committed one loses its
    old copy; half-deleted folders go. `committed_save_id(run, kind, name)` is the save id the server's store
    committed for that checkpoint, or None when it has no row (the in-process clients keep none: their new
    checkpoint stands once it is in place). Returns counts of what was done."""
    counts = {"partial_removed": 0, "rolled_back": 0, "old_removed": 0, "deleted_removed": 0}
    state_dir = Path(state_dir)
    for kind_dir in [d for run in state_dir.iterdir() if run.is_dir() for kind in KINDS
                     if (d := run / kind).is_dir()] if state_dir.is_dir() else []:
        for entry in sorted(kind_dir.iterdir()):
            match = _LEFTOVER.fullmatch(entry.name)
            if match is None:
                continue
            name, what = match.group(1), match.group(2)
            folder = kind_dir / name
            if what == "partial" or what == "deleted":
                remove_tree(entry)
                counts[f"{what}_removed"] += 1
                continue
            current = folder / "meta.json"
            expected = committed_save_id(kind_dir.parent.name, kind_dir.name, name)
            if not current.is_file() or (expected is not None and read_meta(folder).get("save_id") != expected):
                remove_tree(folder)
                entry.rename(folder)
                counts["rolled_back"] += 1
            else:
                remove_tree(entry)
                counts["old_removed"] += 1
        _fsync(kind_dir)
    return counts


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up: after this the tree survives a power cut."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


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
    _fsync(tmp)
    tmp.replace(file)
    _fsync(file.parent)


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
