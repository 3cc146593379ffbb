"""The unmodified tinker-cookbook recipes against `jtinker serve`: supervised chat (chat_sl) and RL on arithmetic
(math_rl), a few steps each, on the tiny preset written as a local Hugging Face folder (weights and tokenizer:
the cookbook loads a folder's tokenizer offline, and `renderer_name=qwen3` renders ChatML for it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

cookbook = pytest.importorskip("tinker_cookbook", reason="pip install --no-deps tinker-cookbook==0.6.1 (README)")
tinker = pytest.importorskip("tinker")

KEY = "tml-cookbook"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from configs import TOKENIZERS_DIR, load_preset
    from jtinker.compare_torch import save_random_hf_checkpoint

    folder = tmp_path_factory.mktemp("tiny-qwen3-moe-hf")
    save_random_hf_checkpoint(load_preset("tiny-qwen3-moe")["hf_config"], folder, seed=0)
    for file in (TOKENIZERS_DIR / "tiny-chatml").iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_folder, jax_cache_dir, jtinker_server):
    state = tmp_path_factory.mktemp("cookbook-state")
    srv = jtinker_server([tiny_folder], state, tmp_path_factory.mktemp("cookbook-log") / "server.log",
                         api_keys=(KEY,), jax_cache=jax_cache_dir, extra_args=("--max-lora-rank", "8"))
    srv.start()
    yield srv
    srv.stop()


def run_recipe(server, module: str, args: list[str], log_path: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(TINKER_BASE_URL=server.url, TINKER_API_KEY=KEY, HF_HUB_OFFLINE="1", TINKER_TELEMETRY="0",
               PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", module, *args, f"log_path={log_path}",
                           "behavior_if_log_dir_exists=delete"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n" \
                                 f"server log:\n{server.log()[-2000:]}"
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_chat_sl_recipe_runs_unchanged(server, tiny_folder, tmp_path):
    data = Path(cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    metrics = run_recipe(server, "tinker_cookbook.recipes.chat_sl.train", [
        f"model_name={tiny_folder}", "renderer_name=qwen3", f"dataset={data}", "batch_size=8", "max_steps=3",
        "lora_rank=8", "learning_rate=1e-3", "save_every=2", "eval_every=0", "max_length=256"], tmp_path / "sl")
    steps = [m for m in metrics if "train_mean_nll" in m]
    assert len(steps) == 3 and all(m["train_mean_nll"] > 0 for m in steps)
    rest = tinker.RestClient(base_url=server.url, api_key=KEY)
    paths = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    assert any("/weights/" in p for p in paths) and any("/sampler_weights/" in p for p in paths)


def test_math_rl_arithmetic_recipe_runs_unchanged(server, tiny_folder, tmp_path):
    metrics = run_recipe(server, "tinker_cookbook.recipes.math_rl.train", [
        f"model_name={tiny_folder}", "renderer_name=qwen3", "env=arithmetic", "group_size=2", "groups_per_batch=2",
        "max_tokens=5", "max_steps=2", "loss_fn=importance_sampling", "eval_every=0", "save_every=1", "lora_rank=8"],
        tmp_path / "rl")
    steps = [m for m in metrics if any(k.startswith("env/all/reward") for k in m)]
    assert len(steps) == 2
