"""Group rollouts through a `SamplingClient` (in-process or the official SDK's), group-relative advantages, and
the trajectories as training `Datum`s for the policy-gradient losses.

A trajectory is a list of transitions (observation tokens, action tokens, the sampler's log-probs of the
action); every transition becomes one datum whose action tokens carry the sampler log-probs and the
trajectory's advantage, and whose observation tokens carry zeros (they are context, not actions).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tinker import types

from rl.envs import Env


@dataclasses.dataclass
class Transition:
    observation: list[int]
    action: list[int]
    logprobs: list[float]


@dataclasses.dataclass
class Trajectory:
    transitions: list[Transition]
    reward: float
    metrics: dict = dataclasses.field(default_factory=dict)


def _sampling_params(max_tokens: int, temperature: float, stop: list[int], seed: int | None = None):
    return types.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop), seed=seed)


def rollout_groups(sampling_client, groups: list[list[Env]], *, max_tokens: int, temperature: float = 1.0,
                   seed: int | None = None) -> list[list[Trajectory]]:
    """Run every group's environments to the end. The first turn of a group is one `sample` request with
    num_samples = group size (one shared prefill); later turns (multi-turn envs) go one request per env. All
    first-turn requests are sent before any result is awaited, so a server can batch them."""
    first = [[env.initial_observation() for env in group] for group in groups]
    futures = []
    for g, (group, obs) in enumerate(zip(groups, first)):
        if any(o.tokens != obs[0].tokens for o in obs):
            raise ValueError("the environments of a group must start from the same observation")
        futures.append(sampling_client.sample(
            prompt=types.ModelInput.from_ints(obs[0].tokens), num_samples=len(group),
            sampling_params=_sampling_params(max_tokens, temperature, obs[0].stop,
                                             None if seed is None else seed + g)))
    out = []
    for group, obs, future in zip(groups, first, futures):
        response = future.result()
        trajectories = []
        for env, ob, seq in zip(group, obs, response.sequences):
            transitions, action, lps = [], list(seq.tokens), list(seq.logprobs)
            while True:
                transitions.append(Transition(ob.tokens, action, lps))
                result = env.step(action)
                if result.done:
                    trajectories.append(Trajectory(transitions, float(result.reward), result.metrics))
                    break
                ob = result.next_observation
                seq = sampling_client.sample(prompt=types.ModelInput.from_ints(ob.tokens), num_samples=1,
                                             sampling_params=_sampling_params(max_tokens, temperature, ob.stop)
                                             ).result().sequences[0]
                action, lps = list(seq.tokens), list(seq.logprobs)
        out.append(trajectories)
    return out


def group_advantages(rewards, normalize_std: bool = False, eps: float = 1e-6) -> np.ndarray:
    """Reward minus the group mean (optionally divided by the group's std): the baseline of GRPO-style RL."""
    r = np.asarray(rewards, np.float64)
    a = r - r.mean()
    if normalize_std:
        a = a / (r.std() + eps)
    return a.astype(np.float32)


def trajectory_datums(trajectory: Trajectory, advantage: float, kl_penalty=None) -> list[types.Datum]:
    """One datum per transition for importance_sampling / ppo / cispo / dro. `kl_penalty`, if given, is one
    array per transition of per-action-token penalties subtracted from the advantage (a KL penalty to a
    reference policy, computed by the caller)."""
    data = []
    for i, tr in enumerate(trajectory.transitions):
        if not tr.action:
            continue
        tokens = tr.observation + tr.action
        n_ob, n = len(tr.observation), len(tokens) - 1
        logprobs = np.zeros(n, np.float32)
        advantages = np.zeros(n, np.float32)
        logprobs[n_ob - 1:] = tr.logprobs
        advantages[n_ob - 1:] = advantage - (0 if kl_penalty is None else np.asarray(kl_penalty[i], np.float32))
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], np.int64)),
                            "logprobs": types.TensorData.from_numpy(logprobs),
                            "advantages": types.TensorData.from_numpy(advantages)}))
    return data
