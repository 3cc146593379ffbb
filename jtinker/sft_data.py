"""Supervised data with Grain: JSONL conversations -> chat template -> token ids with loss weights on the
assistant turns only -> batches of `Datum`s for `forward_backward`.

Each JSONL line is `{"messages": [{"role": ..., "content": ...}, ...]}` (or the bare list). The file is
indexed by line offsets once, so Grain reads it as a random-access source: shuffling is a seeded permutation,
every conversation appears exactly once per epoch, and the iterator's state (`get_state` / `set_state`) lets a
training run resume where it stopped.

Two batchings:
- padded: a fixed number of conversations per batch (the trainer pads them to a power-of-two length bucket);
- packed: conversations grouped so that each batch fills a token budget (`tokens_per_batch`, counted as
  rows x longest row, which is what the padded program computes), so short conversations share a step instead
  of each costing a padded row. Sequences are not concatenated into one row: that would need attention that
  stops at document boundaries, which the Tinker API (one sequence per datum) does not express.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np

from jtinker.sft import conversation_datum
from jtinker.trainer import MIN_TOKENS_BUCKET, Datum
from models.checks import pow2_bucket


class DataError(ValueError):
    """A malformed data file: one line naming the file, the line and what is wrong."""


class JsonlConversations:
    """Random-access Grain source over a JSONL file of conversations (line offsets indexed once)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self._offsets = []
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)
        if not self._offsets:
            raise DataError(f"{self.path}: no conversations (the file is empty)")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> list[dict]:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        where = f"{self.path}: conversation {index + 1}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        messages = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected {{\"messages\": [...]}} or a list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        return messages


class _ToDatum(grain.transforms.Map):
    """Conversation -> Datum (weights on assistant tokens), cut to `max_length` tokens."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def map(self, messages: list[dict]) -> Datum:
        datum = conversation_datum(self.tokenizer, messages)
        if len(datum.tokens) > self.max_length:
            n = self.max_length
            datum = Datum(datum.tokens[:n], {k: v[:n] for k, v in datum.loss_fn_inputs.items()})
        return datum


def conversation_dataset(path: str | Path, tokenizer, *, max_length: int = 2048, seed: int = 0,
                         shuffle: bool = True, num_epochs: int = 1) -> grain.MapDataset:
    """A Grain MapDataset of Datums: seeded shuffle per epoch, then the chat template and loss weights."""
    ds = grain.MapDataset.source(JsonlConversations(path))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(_ToDatum(tokenizer, max_length))


def padded_batches(dataset: grain.MapDataset, batch_size: int, drop_remainder: bool = False):
    """A Grain iterator of lists of `batch_size` Datums (the last may be shorter unless dropped)."""
    return iter(dataset.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder, batch_fn=list))


def packed_batches(dataset: grain.MapDataset, tokens_per_batch: int,
                   min_bucket: int = MIN_TOKENS_BUCKET) -> Iterator[list[Datum]]:
    """Lists of Datums whose padded cost (rows x the power-of-two length bucket of the longest, as the trainer
    pads them) stays within `tokens_per_batch`; a longer datum alone exceeds it and gets a batch of its own."""
    batch: list[Datum] = []
    longest = 0
    for datum in dataset.to_iter_dataset():
        length = pow2_bucket(len(datum.tokens), min_bucket)
        if batch and pow2_bucket(len(batch) + 1) * max(longest, length) > tokens_per_batch:
            yield batch
            batch, longest = [], 0
        batch.append(datum)
        longest = max(longest, length)
    if batch:
        yield batch


def trained_tokens(batch: list[Datum]) -> float:
    return float(sum(np.sum(d.loss_fn_inputs["weights"]) for d in batch))
