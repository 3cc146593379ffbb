"""Environments in the spirit of tinker-cookbook's: an initial observation (prompt tokens and stop condition),
then `step(action tokens)` returning a reward, whether the episode is done, and (multi-turn) the next
observation. A group of environments shares one problem, so rewards can be compared within the group
(group-relative advantages).

Chat rendering goes through the tokenizer's chat template, so the same environment works for every model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass
class Observation:
    tokens: list[int]  # the whole context the policy continues from
    stop: list[int]  # stop token ids (the chat template's end-of-turn)


@dataclasses.dataclass
class StepResult:
    reward: float
    done: bool
    next_observation: Observation | None = None
    metrics: dict = dataclasses.field(default_factory=dict)


class Env:
    """One episode. Subclasses implement `initial_observation` and `step`."""

    def initial_observation(self) -> Observation:
        raise NotImplementedError

    def step(self, action_tokens: list[int]) -> StepResult:
        raise NotImplementedError


class ChatRenderer:
    """Messages <-> tokens through the model's chat template; the end-of-turn token stops sampling."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        end = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if end is None or end == getattr(tokenizer, "unk_token_id", None):
            end = tokenizer.eos_token_id
        self.stop = [int(end)]

    def prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def reply_text(self, action_tokens: Sequence[int]) -> str:
        """The assistant's reply: the action up to (not including) the end-of-turn token."""
        tokens = list(action_tokens)
        for i, t in enumerate(tokens):
            if t in self.stop:
                tokens = tokens[:i]
                break
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class SingleTurnEnv(Env):
    """A question answered in one turn; `reward_fn(reply_text)` scores the reply (exact match by default)."""

    def __init__(self, renderer: ChatRenderer, question: str, answer: str,
                 reward_fn: Callable[[str, str], float] | None = None, system: str | None = None):
        self.renderer, self.question, self.answer = renderer, question, answer
        self.reward_fn = reward_fn or (lambda reply, answer: float(reply == answer))
        self.system = system

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.question}]

    def initial_observation(self) -> Observation:
        return Observation(self.renderer.prompt(self.messages()), self.renderer.stop)

    def step(self, action_tokens: list[int]) -> StepResult:
        reply = self.renderer.reply_text(action_tokens)
        return StepResult(reward=self.reward_fn(reply, self.answer), done=True,
                          metrics={"format_ok": float(any(t in self.renderer.stop for t in action_tokens))})


class MultiTurnEnv(Env):
    """Several questions in one conversation; each turn is scored, the episode's reward is their mean.
    Shows the multi-turn contract: `step` returns the next observation (the conversation so far plus the next
    question) until the last turn."""

    def __init__(self, renderer: ChatRenderer, turns: list[tuple[str, str]]):
        self.renderer, self.turns = renderer, turns
        self.history: list[dict] = []
        self.rewards: list[float] = []

    def initial_observation(self) -> Observation:
        self.history = [{"role": "user", "content": self.turns[0][0]}]
        return Observation(self.renderer.prompt(self.history), self.renderer.stop)

    def step(self, action_tokens: list[int]) -> StepResult:
        reply = self.renderer.reply_text(action_tokens)
        turn = len(self.rewards)
        self.rewards.append(float(reply == self.turns[turn][1]))
        self.history.append({"role": "assistant", "content": reply})
        if turn + 1 == len(self.turns):
            return StepResult(reward=sum(self.rewards) / len(self.rewards), done=True)
        self.history.append({"role": "user", "content": self.turns[turn + 1][0]})
        return StepResult(reward=0.0, done=False,
                          next_observation=Observation(self.renderer.prompt(self.history), self.renderer.stop))
