"""RL loops on the Tinker API: the same code drives the in-process `jtinker.ServiceClient` and, through the
official SDK, a `jtinker serve` (or any Tinker-compatible service).

- synchronous on-policy: each step samples groups with a snapshot of the current adapter, computes
  group-relative advantages, takes one forward_backward + optim_step;
- asynchronous off-policy: a sampler thread keeps producing batches with the newest snapshot while the trainer
  consumes them; a batch more than `max_staleness` policy versions old is dropped, and the importance-sampling
  family of losses corrects for the (bounded) lag with the sampler's own log-probs.

Collocated in-process, the sampler snapshot is a copy of the adapter's LoRA slot: the frozen base weights are
shared and never move (see `bytes_moved_per_step`).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
from tinker import types

from rl.envs import ChatRenderer
from rl.metrics import MetricsLog, plot_curves
from rl.rollouts import group_advantages, rollout_groups, trajectory_datums
from rl.tasks import Task


@dataclasses.dataclass
class RLConfig:
    task: str = "reverse"
    group_size: int = 8
    groups_per_batch: int = 8
    steps: int = 20
    max_tokens: int = 12
    temperature: float = 1.0
    learning_rate: float = 1e-3
    loss_fn: str = "importance_sampling"
    loss_fn_config: dict | None = None
    normalize_advantage_std: bool = False
    kl_coef: float = 0.0  # per-token penalty coef * (log p_sampler - log p_base), needs a base sampling client
    mode: str = "sync"  # or "async"
    max_staleness: int = 1
    eval_every: int = 5
    eval_problems: int = 64
    save_every: int = 0
    log_dir: str | None = None
    seed: int = 0


def evaluate(sampling_client, task: Task, renderer: ChatRenderer, n: int, max_tokens: int) -> float:
    """Mean exact-match reward of greedy replies on the task's held-out problems."""
    problems = task.heldout_problems(n)
    groups = [[task.env(renderer, p)] for p in problems]
    trajectories = rollout_groups(sampling_client, groups, max_tokens=max_tokens, temperature=0.0)
    return float(np.mean([t[0].reward for t in trajectories]))


def _kl_penalties(base_sampler, trajectory, coef: float):
    """Per action token coef * (log p_sampler - log p_base) for each transition of a trajectory."""
    out = []
    for tr in trajectory.transitions:
        full = types.ModelInput.from_ints(tr.observation + tr.action)
        base_lp = np.asarray(base_sampler.compute_logprobs(full).result()[len(tr.observation):], np.float32)
        out.append(coef * (np.asarray(tr.logprobs, np.float32) - base_lp))
    return out


def _batch(task, renderer, config: RLConfig, step: int):
    problems = task.train_problems(config.groups_per_batch, seed=config.seed * 100003 + step)
    return [[task.env(renderer, p) for _ in range(config.group_size)] for p in problems]


def _sampling_seed(config: RLConfig, step: int) -> int:
    """Seeded sampling per step (and per group inside it): a run is reproducible for a fixed `config.seed`."""
    return (config.seed * 1_000_003 + step * 1_009) % 2**31


def _train_on(training_client, groups, config: RLConfig, base_sampler) -> dict:
    """Advantages, datums, one forward_backward and one optim_step. A group whose rewards are all equal carries
    no signal: its advantages are zero, so its datums add nothing to the gradient, but they are still sent, so
    that every step trains on a batch of the same shape (one compiled program instead of one per number of
    groups with signal). A step where no group has signal makes no update at all."""
    data, rewards, kept = [], [], 0
    for trajectories in groups:
        r = [t.reward for t in trajectories]
        rewards += r
        signal = np.ptp(r) > 0
        kept += int(signal)
        advantages = group_advantages(r, config.normalize_advantage_std) if signal else np.zeros(len(r))
        for t, a in zip(trajectories, advantages):
            kl = _kl_penalties(base_sampler, t, config.kl_coef) if signal and config.kl_coef and base_sampler else None
            data += trajectory_datums(t, float(a), kl)
    metrics = {"reward_mean": float(np.mean(rewards)), "groups_with_signal": kept,
               "tokens_sampled": int(sum(len(tr.action) for g in groups for t in g for tr in t.transitions))}
    if kept:
        out = training_client.forward_backward(data, config.loss_fn, config.loss_fn_config).result()
        training_client.optim_step(types.AdamParams(learning_rate=config.learning_rate)).result()
        metrics["loss"] = float(out.metrics["loss:sum"])
    return metrics


def bytes_moved_per_step(training_client) -> dict:
    """What a sampler snapshot copies, in-process: one slot of the LoRA factors. The base weights are the
    trainer's own arrays, shared by the sampler, so none of their bytes move."""
    from flax import nnx

    engine = getattr(training_client, "engine", None)
    if engine is None:
        return {}
    lora = sum(a.nbytes for a in engine.trainer.lora.values()) // engine.lora.num_slots
    base = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(engine.trainer.base))
    return {"lora_bytes_per_snapshot": int(lora), "base_bytes": int(base), "base_bytes_moved": 0}


def run_rl(training_client, tokenizer, config: RLConfig, *, task=None, base_sampler=None,
           progress: bool = True) -> dict:
    """Train with RL; returns a summary (rewards before/after on held-out problems, metrics path, plot).
    `task` overrides the built-in `config.task` with any object of `rl.tasks.Task`'s interface."""
    from tqdm import tqdm

    task, renderer = task or Task(config.task), ChatRenderer(tokenizer)
    log_dir = Path(config.log_dir) if config.log_dir else None
    start_step = 0
    if log_dir is not None and (log_dir / "checkpoint.json").exists():  # resume
        saved = json.loads((log_dir / "checkpoint.json").read_text())
        training_client.load_state_with_optimizer(saved["path"]).result()
        start_step = saved["step"]
    log = MetricsLog(log_dir / "metrics.jsonl", resume_from_step=start_step) if log_dir else None

    sampler = training_client.save_weights_and_get_sampling_client()
    before = evaluate(sampler, task, renderer, config.eval_problems, config.max_tokens)
    rows, version = [], start_step
    state = {"sampler": sampler, "version": start_step, "stop": False, "dropped": 0}
    batches: queue.Queue = queue.Queue(maxsize=max(1, config.max_staleness))

    def produce():  # async mode: sample with the newest snapshot, forever ahead of the trainer
        step = start_step
        while not state["stop"]:
            sampler_now, v = state["sampler"], state["version"]
            groups = rollout_groups(sampler_now, _batch(task, renderer, config, step), max_tokens=config.max_tokens,
                                    temperature=config.temperature, seed=_sampling_seed(config, step))
            batches.put((v, groups))
            step += 1

    if config.mode == "async":
        producer = threading.Thread(target=produce, daemon=True, name="rl-sampler")
        producer.start()
    elif config.mode != "sync":
        raise ValueError(f"mode must be 'sync' or 'async', got {config.mode!r}")
    bar = tqdm(range(start_step, config.steps), desc="rl", unit="step", disable=not progress,
               initial=start_step, total=config.steps)
    t_start = time.perf_counter()
    for step in bar:
        if config.mode == "sync":
            groups, version = rollout_groups(state["sampler"], _batch(task, renderer, config, step),
                                             max_tokens=config.max_tokens, temperature=config.temperature,
                                             seed=_sampling_seed(config, step)), step
        else:
            while True:
                version, groups = batches.get()
                if step - version <= config.max_staleness:
                    break
                state["dropped"] += 1
        metrics = _train_on(training_client, groups, config, base_sampler)
        state["sampler"] = training_client.save_weights_and_get_sampling_client()
        state["version"] = step + 1
        row = {"step": step, "staleness": step - version, **metrics, "seconds": time.perf_counter() - t_start}
        if config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            row["eval_reward"] = evaluate(state["sampler"], task, renderer, config.eval_problems, config.max_tokens)
        if config.save_every and log_dir is not None and (step + 1) % config.save_every == 0:
            path = training_client.save_state(f"rl-step-{step + 1}").result().path
            (log_dir / "checkpoint.json").write_text(json.dumps({"step": step + 1, "path": path}))
        rows.append(row)
        if log:
            log.write(row)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}",
                        **({"eval": f"{row['eval_reward']:.2f}"} if "eval_reward" in row else {}))
    state["stop"] = True
    while not batches.empty():  # unblock the producer so it can see the stop flag (and drop its snapshot)
        batches.get_nowait()
    after = evaluate(state["sampler"], task, renderer, config.eval_problems, config.max_tokens)
    summary = {"task": getattr(task, "name", config.task), "mode": config.mode, "reward_before_rl": before, "reward_after_rl": after,
               "steps": config.steps, "dropped_stale_batches": state["dropped"], **bytes_moved_per_step(training_client)}
    if log_dir is not None:
        all_rows = log.read()
        if all_rows:
            summary["plot"] = str(plot_curves(all_rows, ["reward_mean", "eval_reward"], log_dir / "reward.png",
                                              title=f"RL on {config.task}: train reward and held-out exact match"))
        summary["metrics"] = str(log.path)
    return summary
