"""Test setup: 8 virtual CPU devices (set before JAX is imported), full-precision fp32 matmuls and strictly
offline Hugging Face."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# fp32 means fp32 on GPUs too (XLA would otherwise use TF32 dots there): the references tests compare against.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import json  # noqa: E402

import pytest  # noqa: E402


def tiny_hf_config(**overrides) -> dict:
    """A small Qwen3-MoE config.json; init std 0.1 so logits are O(1) and routing is far from uniform."""
    cfg = dict(model_type="qwen3_moe", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=12, num_experts=8,
               num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256, rms_norm_eps=1e-6,
               initializer_range=0.1, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0})
    cfg.update(overrides)
    return cfg


def save_hf_checkpoint(hf_config: dict, out_dir, seed: int = 0, **save_kwargs):
    """transformers' own Qwen3MoeForCausalLM, randomly initialised, written by save_pretrained."""
    from jtinker.compare_torch import save_random_hf_checkpoint

    return save_random_hf_checkpoint(hf_config, out_dir, seed=seed, **save_kwargs)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (name, config overrides) -> a saved transformers checkpoint folder, built once per session."""
    cache = {}

    def make(name: str, seed: int = 0, save_kwargs: dict | None = None, **overrides):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            save_hf_checkpoint(tiny_hf_config(**overrides), out, seed=seed, **(save_kwargs or {}))
            cache[name] = out
        return cache[name]

    return make


def read_json(path):
    return json.loads(path.read_text())


def tiny_deepseek_config(**overrides) -> dict:
    """A small DeepSeek-V3 / Kimi K2 config.json (Kimi-style routing: one group, scaling 2.827, YaRN)."""
    cfg = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
               q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
               norm_topk_prob=True, routed_scaling_factor=2.827, max_position_embeddings=256, rms_norm_eps=1e-6,
               initializer_range=0.1, rope_interleave=True, num_nextn_predict_layers=0, tie_word_embeddings=False,
               rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "beta_fast": 1.0,
                                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 16})
    cfg.update(overrides)
    return cfg


def save_deepseek_checkpoint(hf_config: dict, out_dir, seed: int = 0, bias_std: float = 0.1, **save_kwargs):
    """transformers' DeepseekV3ForCausalLM, random, with a non-zero e_score_correction_bias (random init leaves it
    zero, which would hide a bias used for weighting instead of only for choosing)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model_type = hf_config.get("model_type", "deepseek_v3")
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, bias_std)
    model.save_pretrained(out_dir, **save_kwargs)
    if model_type != "deepseek_v3":  # e.g. Kimi K2's own model_type
        config_path = out_dir / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": model_type}))
    return out_dir


@pytest.fixture(scope="session")
def deepseek_checkpoint(tmp_path_factory):
    cache = {}

    def make(name: str, seed: int = 0, **overrides):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            save_deepseek_checkpoint(tiny_deepseek_config(**overrides), out, seed=seed)
            cache[name] = out
        return cache[name]

    return make


def tiny_vl_config(**text_overrides) -> dict:
    """A small Qwen3-VL-MoE config.json: 3 text layers, 8 experts, 2I != H (so fused expert layouts are
    unambiguous), M-RoPE sections [4, 2, 2]; a 3-block vision tower with DeepStack from blocks 0 and 1."""
    text = dict(vocab_size=1100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True},
                max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.1)
    text.update(text_overrides)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1], initializer_range=0.1)
    return dict(model_type="qwen3_vl_moe", text_config=text, vision_config=vision, image_token_id=1000,
                video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def vl_checkpoint(tmp_path_factory):
    cache = {}

    def make(name: str, seed: int = 0, **text_overrides):
        if name not in cache:
            import torch
            from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

            fields = {k: v for k, v in tiny_vl_config(**text_overrides).items() if k != "model_type"}
            torch.manual_seed(seed)
            out = tmp_path_factory.mktemp(name)
            Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**fields)).eval().save_pretrained(out)
            cache[name] = out
        return cache[name]

    return make


class JtinkerServer:
    """`jtinker serve` as a subprocess on a free loopback port (real HTTP, the real CLI). `kill()` is SIGKILL;
    `start()` again reuses the port and state directory, as a restarted server would."""

    def __init__(self, models, state_dir, log_path, api_keys=(), extra_args=(), jax_cache=None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.args = ["--port", str(self.port), "--state-dir", str(state_dir)]
        for model in models:
            self.args += ["--model", str(model)]
        for key in api_keys:
            self.args += ["--api-key", key]
        self.args += list(extra_args)
        self.log_path, self.jax_cache, self.process = log_path, jax_cache, None
        self.clients = []

    def sdk_client(self, api_key: str):
        """An official-SDK `ServiceClient` of this server, closed by `stop()`: an open one keeps heartbeating
        from a background thread long after the server is gone, until the test process exits."""
        import tinker

        client = tinker.ServiceClient(base_url=self.url, api_key=api_key)
        self.clients.append(client)
        return client

    def start(self, timeout: float = 180.0):
        import subprocess
        import sys
        import time
        import urllib.request

        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TINKER_API_KEY", "TINKER_BASE_URL")}
        env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if self.jax_cache:
            env["JAX_COMPILATION_CACHE_DIR"] = str(self.jax_cache)
        log = open(self.log_path, "a")
        self.process = subprocess.Popen([sys.executable, "-m", "jtinker", "serve", *self.args], stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jtinker serve exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/v1/healthz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"jtinker serve did not become healthy in {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return open(self.log_path).read()

    def kill(self):
        import signal

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self):
        import contextlib

        for client in self.clients:  # while the server still answers; a test may have closed one already
            with contextlib.suppress(Exception):
                client.close("success").result(timeout=30)
        self.clients = []
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except Exception:  # noqa: BLE001
                self.kill()


@pytest.fixture(scope="session")
def jtinker_server():
    """The `JtinkerServer` class (a fixture, so test modules need not import conftest)."""
    return JtinkerServer


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
    """One persistent JAX compilation cache for every server a test session starts (restarts hit it)."""
    return tmp_path_factory.mktemp("jax-cache")
