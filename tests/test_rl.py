"""RL on the in-process Tinker API: rollouts, advantages, datums, built-in tasks, the sync and async loops,
metrics and resume, and a learned reward model."""

import json

import numpy as np
import pytest

import jtinker as tinker
from rl.envs import ChatRenderer, MultiTurnEnv, SingleTurnEnv, StepResult
from rl.metrics import MetricsLog
from rl.reward_models import LearnedRewardModel
from rl.rollouts import Trajectory, Transition, group_advantages, rollout_groups, trajectory_datums
from rl.tasks import GENERATORS, Problem, Task
from rl.train import RLConfig, run_rl


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    return tinker.ServiceClient(state_dir=tmp_path_factory.mktemp("rl-state"), num_slots=12, max_rank=8)


@pytest.fixture(scope="module")
def tokenizer(service):
    return service.create_sampling_client(base_model="tiny-qwen3-moe").get_tokenizer()


def test_group_advantages_and_datums():
    np.testing.assert_allclose(group_advantages([1, 0, 0, 1]), [0.5, -0.5, -0.5, 0.5])
    a = group_advantages([3.0, 1.0, 2.0], normalize_std=True)
    np.testing.assert_allclose(a, (np.array([3, 1, 2]) - 2) / np.std([3, 1, 2]), rtol=1e-5)
    traj = Trajectory([Transition(observation=[5, 6, 7], action=[8, 9], logprobs=[-0.5, -1.5])], reward=1.0)
    (datum,) = trajectory_datums(traj, 0.25, kl_penalty=[np.array([0.1, -0.2])])
    assert datum.model_input.to_ints() == [5, 6, 7, 8]
    inputs = {k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()}
    np.testing.assert_array_equal(inputs["target_tokens"], [6, 7, 8, 9])
    np.testing.assert_allclose(inputs["logprobs"], [0, 0, -0.5, -1.5])  # only the action tokens are actions
    np.testing.assert_allclose(inputs["advantages"], [0, 0, 0.15, 0.45])


def test_tasks_split_and_reward_exact_matches(tokenizer):
    renderer = ChatRenderer(tokenizer)
    for name in GENERATORS:
        task = Task(name)
        heldout = {p.question for p in task.heldout_problems(64)}
        train = task.train_problems(200, seed=1)
        assert len(train) == 200 and not heldout & {p.question for p in train}
        p = train[0]
        env = task.env(renderer, p)
        ob = env.initial_observation()
        assert tokenizer.decode(ob.tokens).count(p.question) == 1
        right = tokenizer.encode(p.answer, add_special_tokens=False) + renderer.stop
        assert env.step(right).reward == 1.0
        assert task.env(renderer, p).step(tokenizer.encode(p.answer + "0", add_special_tokens=False)).reward == 0.0
    assert Task("reverse").heldout_problems(1)[0].answer == " ".join(
        reversed(Task("reverse").heldout_problems(1)[0].question.split(": ")[1].split()))
    env = MultiTurnEnv(renderer, [("Say 1", "1"), ("Say 2", "2")])
    env.initial_observation()
    first = env.step(tokenizer.encode("1", add_special_tokens=False) + renderer.stop)
    assert not first.done and "Say 2" in tokenizer.decode(first.next_observation.tokens)
    last = env.step(tokenizer.encode("3", add_special_tokens=False) + renderer.stop)
    assert last.done and last.reward == 0.5


class LowHalfEnv(SingleTurnEnv):
    """Reward 1 when the first sampled token is in the lower half of the vocabulary: about half of random
    replies at first, so every group carries signal and a few steps of RL move the policy measurably (the
    mechanics test; the quickstart shows a built-in task)."""

    def step(self, action_tokens):
        return StepResult(reward=float(bool(action_tokens) and action_tokens[0] < 256), done=True)


class LowHalfTask:
    name = "low-half"

    def train_problems(self, n, seed):
        return [Problem(f"Say something ({seed % 97}, {i}).", "") for i in range(n)]

    def heldout_problems(self, n):
        return [Problem(f"Say something (held out {i}).", "") for i in range(n)]

    def env(self, renderer, problem):
        return LowHalfEnv(renderer, problem.question, problem.answer)


def _rl(service, tokenizer, tmp_path, mode, steps=12, **overrides):
    client = service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=8, seed=0)
    config = RLConfig(steps=steps, group_size=8, groups_per_batch=4, max_tokens=1, learning_rate=3e-2,
                      eval_every=0, eval_problems=16, mode=mode, log_dir=str(tmp_path / mode), seed=1, **overrides)
    return client, run_rl(client, tokenizer, config, task=LowHalfTask(), progress=False)


def test_sync_and_async_rl_raise_the_reward(service, tokenizer, tmp_path):
    _, sync = _rl(service, tokenizer, tmp_path, "sync")
    rows = MetricsLog(tmp_path / "sync" / "metrics.jsonl", resume_from_step=10**9).read()
    early, late = np.mean([r["reward_mean"] for r in rows[:3]]), np.mean([r["reward_mean"] for r in rows[-3:]])
    assert late > early + 0.3, (early, late)  # (greedy held-out eval is no measure here: argmax is already low)
    assert (tmp_path / "sync" / "reward.png").stat().st_size > 1000
    assert sync["base_bytes_moved"] == 0 and 0 < sync["lora_bytes_per_snapshot"] < sync["base_bytes"]

    _, lagged = _rl(service, tokenizer, tmp_path, "async", max_staleness=1)
    rows = MetricsLog(tmp_path / "async" / "metrics.jsonl", resume_from_step=10**9).read()
    assert max(r["staleness"] for r in rows) <= 1 and any(r["staleness"] == 1 for r in rows)
    lagged_early = np.mean([r["reward_mean"] for r in rows[:3]])
    lagged_late = np.mean([r["reward_mean"] for r in rows[-3:]])
    # One step of staleness may slow learning, so the async loop is held to learning too, not to the sync
    # loop's pace (that comparison flipped with rounding-level changes to the model's numerics).
    assert lagged_late > lagged_early + 0.15, (lagged_early, lagged_late)  # 3 standard errors


def test_checkpoints_and_resume(service, tokenizer, tmp_path):
    client, first = _rl(service, tokenizer, tmp_path, "sync", steps=4, save_every=2)
    saved = json.loads((tmp_path / "sync" / "checkpoint.json").read_text())
    assert saved["step"] == 4 and saved["path"].startswith("tinker://")
    _, resumed = _rl(service, tokenizer, tmp_path, "sync", steps=6, save_every=2)  # continues at step 4
    steps = [r["step"] for r in MetricsLog(tmp_path / "sync" / "metrics.jsonl", resume_from_step=10**9).read()]
    assert steps == list(range(6))


def test_learned_reward_model_learns_preferences_online(service, tokenizer):
    judge = LearnedRewardModel(service.create_lora_training_client(base_model="tiny-qwen3-moe", rank=8, seed=3),
                               tokenizer, verdict="Yes", learning_rate=5e-3)
    prompts = [f"What is {a} + {a}?" for a in range(1, 7)]
    chosen = [str(2 * a) for a in range(1, 7)]
    rejected = ["I do not know."] * len(prompts)
    stats = [judge.update(prompts, chosen, rejected) for _ in range(5)]  # pairs streaming in, one update each
    assert stats[-1]["bt_loss"] < stats[0]["bt_loss"] - 0.3, stats
    unseen = [f"What is {a} + {a}?" for a in range(7, 10)]  # the preference generalises to unseen prompts
    margin = np.array(judge.score(unseen, [str(2 * a) for a in range(7, 10)])) - np.array(
        judge.score(unseen, ["I do not know."] * 3))
    assert np.all(margin > 0), margin


def test_the_same_rl_code_drives_jtinker_serve_through_the_official_sdk(tmp_path_factory, jax_cache_dir,
                                                                       jtinker_server):
    """run_rl unchanged, on a training client of the official `tinker` SDK talking to `jtinker serve`."""
    srv = jtinker_server(["tiny-qwen3-moe"], tmp_path_factory.mktemp("rl-server-state"),
                         tmp_path_factory.mktemp("rl-server-log") / "server.log", api_keys=("tml-rl",),
                         jax_cache=jax_cache_dir, extra_args=("--max-lora-rank", "8"))
    srv.start()
    try:
        client = srv.sdk_client("tml-rl").create_lora_training_client(
            base_model="tiny-qwen3-moe", rank=8, seed=0).result()
        log_dir = tmp_path_factory.mktemp("rl-over-http")
        config = RLConfig(steps=4, group_size=4, groups_per_batch=2, max_tokens=1, learning_rate=3e-2,
                          eval_every=2, eval_problems=4, log_dir=str(log_dir), seed=1)
        summary = run_rl(client, client.get_tokenizer(), config, task=LowHalfTask(), progress=False)
        rows = MetricsLog(log_dir / "metrics.jsonl", resume_from_step=10**9).read()
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert all(r["tokens_sampled"] == 8 for r in rows)  # 2 problems x 4 samples x 1 token, every step
        assert any("loss" in r for r in rows) and 0.0 <= summary["reward_after_rl"] <= 1.0
    finally:
        srv.stop()
