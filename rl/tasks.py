"""Built-in verifiable tasks with exact-match rewards: problems are generated from a seed, split into disjoint
train and held-out sets, and rendered as single-turn chats.

- `reverse`: "Reverse: 4 7 1" -> "1 7 4" (a list of digits, reversed)
- `sort`: "Sort: 4 7 1" -> "1 4 7"
- `addition`: "What is 12 + 30?" -> "42" (multi-digit)
- `last_digit`: "Last digit of 4 7 1?" -> "1" (the quickstart's: one answer token, learnable by a tiny model)
- `format`: "Answer in the form 'Answer: X'. Repeat 5 2." -> "Answer: 5 2" (following an output format)
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import numpy as np

from rl.envs import ChatRenderer, SingleTurnEnv


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def _digits(rng, n):
    return [int(d) for d in rng.integers(0, 10, n)]


def _reverse(rng, length: int = 3) -> Problem:
    xs = _digits(rng, length)
    return Problem("Reverse: " + " ".join(map(str, xs)), " ".join(map(str, xs[::-1])))


def _sort(rng, length: int = 3) -> Problem:
    xs = _digits(rng, length)
    return Problem("Sort: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs))))


def _addition(rng, digits: int = 2) -> Problem:
    a, b = (int(v) for v in rng.integers(10 ** (digits - 1), 10**digits, 2))
    return Problem(f"What is {a} + {b}?", str(a + b))


def _format(rng, length: int = 2) -> Problem:
    x = " ".join(map(str, _digits(rng, length)))
    return Problem(f"Answer in the form 'Answer: X'. Repeat {x}.", f"Answer: {x}")


def _last_digit(rng, length: int = 3) -> Problem:
    xs = _digits(rng, length)
    return Problem("Last digit of " + " ".join(map(str, xs)) + "?", str(xs[-1]))


GENERATORS: dict[str, Callable] = {"reverse": _reverse, "sort": _sort, "addition": _addition, "format": _format,
                                   "last_digit": _last_digit}


class Task:
    """A built-in task. Questions are split by a hash into train (about 80%) and held-out (about 20%), so
    `train_problems(n, seed)` and `heldout_problems(n)` never share a question, however small the task."""

    def __init__(self, name: str, **params):
        if name not in GENERATORS:
            raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(GENERATORS)}")
        self.name, self.params = name, params

    @staticmethod
    def is_heldout(problem: Problem) -> bool:
        return zlib.crc32(problem.question.encode()) % 5 == 0

    def _draw(self, n: int, seed: int, heldout: bool) -> list[Problem]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(1000 * n):
            p = GENERATORS[self.name](rng, **self.params)
            if self.is_heldout(p) == heldout:
                out.append(p)
                if len(out) == n:
                    return out
        raise ValueError(f"task {self.name!r} with {self.params} has too few distinct questions to draw {n} "
                         f"{'held-out' if heldout else 'training'} problems")

    def heldout_problems(self, n: int = 64) -> list[Problem]:
        return self._draw(n, seed=10**6, heldout=True)

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return self._draw(n, seed=seed, heldout=False)

    def env(self, renderer: ChatRenderer, problem: Problem) -> SingleTurnEnv:
        return SingleTurnEnv(renderer, problem.question, problem.answer)

    def conversation(self, problem: Problem) -> list[dict]:
        """The problem solved, as a chat (for supervised warm-up)."""
        return [{"role": "user", "content": problem.question}, {"role": "assistant", "content": problem.answer}]
