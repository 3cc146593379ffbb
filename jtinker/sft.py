"""Supervised data: conversations through the model's chat template to token ids with loss weights on the
assistant turns only, and a small built-in arithmetic set for the quickstart and tests."""

from __future__ import annotations

import numpy as np

from jtinker.trainer import Datum


def conversation_datum(tokenizer, messages: list[dict]) -> Datum:
    """Next-token datum of a whole conversation: weight 1 on every token of each assistant message (its end
    token included), 0 elsewhere. Spans come from rendering growing prefixes, so any chat template works as
    long as its rendering of a prefix is a prefix of the rendering (true of ChatML-style templates)."""
    render = lambda msgs, gen=False: tokenizer.encode(  # noqa: E731
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen), add_special_tokens=False)
    ids = render(messages)
    weights = np.zeros(len(ids), np.float32)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], gen=True)), len(render(messages[:i + 1]))
        if ids[:start] != render(messages[:i], gen=True):
            raise ValueError("the chat template does not render prefixes as prefixes; cannot place loss weights")
        weights[start:end] = 1.0
    ids = np.asarray(ids, np.int64)
    return Datum(ids[:-1], {"target_tokens": ids[1:], "weights": weights[1:]})


def builtin_arithmetic(n: int = 8, seed: int = 0) -> list[list[dict]]:
    """Two-number additions as short conversations, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    conversations = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(1, 50, 2))
        conversations.append([{"role": "user", "content": f"What is {a} + {b}?"},
                              {"role": "assistant", "content": f"{a} + {b} = {a + b}."}])
    return conversations
