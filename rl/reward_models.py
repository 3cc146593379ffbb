"""Reward models: the interface RL uses, an exact-match reward, and a learned reward model that is a LoRA
adapter on the same base, trained online from preference pairs as they stream in.

The learned model scores a reply by the log-probability of a fixed verdict token after a judge prompt
("...Is this a good reply? " -> "Yes"), so it needs nothing beyond the Tinker training API: scoring is a
`forward`, and a Bradley-Terry update (loss -log sigmoid(s_chosen - s_rejected)) is a forward to read the scores
followed by a cross-entropy `forward_backward` whose per-token weights are exactly -dLoss/ds on the verdict
tokens (the same trick as `forward_backward_custom`, without needing torch). It therefore runs in-process and
against any Tinker-compatible server alike.
"""

from __future__ import annotations

import numpy as np
from tinker import types


class RewardModel:
    def score(self, prompts: list[str], replies: list[str]) -> list[float]:
        raise NotImplementedError


class ExactMatchReward(RewardModel):
    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def score(self, prompts, replies):
        return [float(self.answers.get(p) == r) for p, r in zip(prompts, replies)]


class LearnedRewardModel(RewardModel):
    """A reward adapter (its own training client) on the policy's base model."""

    def __init__(self, training_client, tokenizer, verdict: str = "Yes", learning_rate: float = 1e-2):
        self.client, self.tokenizer, self.learning_rate = training_client, tokenizer, learning_rate
        ids = tokenizer.encode(verdict, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the verdict {verdict!r} must be one token for this tokenizer (got {len(ids)})")
        self.verdict_id = ids[0]

    def _datum(self, prompt: str, reply: str, weight: float = 0.0) -> types.Datum:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Question: {prompt}\nReply: {reply}\nIs this a good reply?"}],
            tokenize=False, add_generation_prompt=True)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        targets = ids[1:] + [self.verdict_id]
        weights = np.zeros(len(ids), np.float32)
        weights[-1] = weight
        return types.Datum(model_input=types.ModelInput.from_ints(ids),
                           loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.asarray(targets, np.int64)),
                                           "weights": types.TensorData.from_numpy(weights)})

    def score(self, prompts, replies) -> list[float]:
        """log p(verdict | judge prompt) per reply: higher is better."""
        data = [self._datum(p, r) for p, r in zip(prompts, replies)]
        out = self.client.forward(data, "cross_entropy").result()
        return [float(o["logprobs"].to_numpy()[-1]) for o in out.loss_fn_outputs]

    def update(self, prompts, chosen, rejected) -> dict:
        """One Bradley-Terry step on preference pairs; returns the mean loss and accuracy before the step."""
        s_c = np.asarray(self.score(prompts, chosen))
        s_r = np.asarray(self.score(prompts, rejected))
        margin = s_c - s_r
        p = 1.0 / (1.0 + np.exp(-margin))
        # d(-log sigmoid(s_c - s_r))/ds_c = -(1 - p) and /ds_r = +(1 - p); cross-entropy on the verdict token with
        # weight w contributes -w * s, so w = -dLoss/ds gives exactly this gradient.
        data = ([self._datum(q, c, float(1 - pi)) for q, c, pi in zip(prompts, chosen, p)]
                + [self._datum(q, r, float(-(1 - pi))) for q, r, pi in zip(prompts, rejected, p)])
        self.client.forward_backward(data, "cross_entropy").result()
        self.client.optim_step(types.AdamParams(learning_rate=self.learning_rate)).result()
        return {"bt_loss": float(np.mean(np.log1p(np.exp(-margin)))), "accuracy": float(np.mean(margin > 0))}
