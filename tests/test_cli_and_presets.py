"""The CLI contracts of DESIGN.md, the presets, and the logical axes every parameter carries."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from configs import list_presets, load_preset
from jtinker.cli import main as cli_main
from models.lora import LoraConfig
from models.registry import create_abstract_model, create_model, parameter_counts, preset_config
from parallel import spec_for

COMPARE_KEYS = {"max_abs_logit_diff", "mean_abs_logit_diff", "kl", "top1_agreement", "router_agreement", "dtype",
                "mesh"}


def test_compare_torch_command_prints_json_and_exits_zero(hf_checkpoint):
    model_dir = hf_checkpoint("cli_default")
    proc = subprocess.run([sys.executable, "-m", "jtinker", "compare-torch", str(model_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert COMPARE_KEYS <= set(result) and result["dtype"] == "float32" and result["passed"]
    assert result["max_abs_logit_diff"] <= 1e-5
    assert "PASS" in proc.stdout


def test_compare_torch_bf16_and_failure_exit_code(hf_checkpoint, capsys):
    model_dir = hf_checkpoint("cli_default")
    assert cli_main(["compare-torch", str(model_dir), "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dtype"] == "bfloat16" and COMPARE_KEYS <= set(result)
    # A tolerance nothing can meet makes it fail with exit status 1.
    assert cli_main(["compare-torch", str(model_dir), "--tolerance", "0", "--json"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["passed"] is False


def test_compare_torch_rejects_a_missing_folder(tmp_path, capsys):
    assert cli_main(["compare-torch", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_quickstart_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jtinker", "quickstart", "--json", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["fresh_adapter_is_noop"]
    assert result["compare_float32"]["max_abs_logit_diff"] <= 1e-5
    assert result["compare_float32"]["router_agreement"] == 1.0
    assert result["sft_loss_end"] < 0.5 * result["sft_loss_start"]  # the supervised warm-up learned
    fresh, sft, rl = result["reward_base"], result["reward_before_rl"], result["reward_after_rl"]
    assert rl >= max(fresh + 0.3, 2 * fresh), (fresh, sft, rl)  # held-out problems of a built-in task
    assert rl >= sft - 0.15, (fresh, sft, rl)  # RL keeps what SFT reached
    assert result["served"]["reply"] is not None and result["served"]["usage"]["completion_tokens"] >= 1
    assert (tmp_path / "rl" / "reward.png").is_file() and result["base_bytes_moved"] == 0
    assert result["seconds"] < 600


def test_presets_load_and_name_their_tokenizer():
    assert {"tiny-qwen3-moe", "small-qwen3-moe", "qwen3-30b-a3b", "tiny-kimi-k2", "kimi-k2-instruct",
            "kimi-k2-thinking", "deepseek-v3", "tiny-qwen3-vl-moe", "qwen3-vl-30b-a3b",
            "qwen3-vl-235b-a22b"} <= set(list_presets())
    small = preset_config("small-qwen3-moe")
    assert (small.vocab_size, small.hidden_size, small.num_hidden_layers, small.num_attention_heads,
            small.num_key_value_heads, small.head_dim, small.num_experts, small.num_experts_per_tok,
            small.moe_intermediate_size) == (8192, 512, 4, 8, 2, 64, 32, 4, 256)
    for name in list_presets():
        preset_config(name)  # every preset parses
        assert "tokenizer" in load_preset(name)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_preset("nope")


def _transformers_meta_count(preset: str) -> int:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    hf = {k: v for k, v in load_preset(preset)["hf_config"].items()
          if k not in ("model_type", "quantization_config", "architectures")}
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if "qwen3-vl" in preset
                             else (Qwen3MoeConfig, Qwen3MoeForCausalLM) if "qwen3" in preset
                             else (DeepseekV3Config, DeepseekV3ForCausalLM))
    with torch.device("meta"):
        model = model_cls(config_cls(**hf))
    # DeepSeek's e_score_correction_bias is a checkpoint tensor that transformers registers as a buffer.
    biases = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in model.parameters()) + biases


@pytest.mark.parametrize("preset,billions", [("qwen3-30b-a3b", 30.53), ("kimi-k2-instruct", 1026.41),
                                             ("kimi-k2-thinking", 1026.41), ("deepseek-v3", 671.03),
                                             ("qwen3-vl-30b-a3b", 31.07), ("qwen3-vl-235b-a22b", 235.67)])
def test_full_size_presets_build_abstractly_with_the_right_parameter_count(preset, billions):
    """Shapes only, in seconds: exactly the parameters transformers builds on the meta device, and the
    published sizes (Kimi K2 1026.4B, DeepSeek-V3 without MTP 671.0B) within 0.1%."""
    model = create_abstract_model(preset_config(preset))
    count = parameter_counts(model)["total"]
    assert count == _transformers_meta_count(preset)
    assert abs(count / 1e9 - billions) / billions < 1e-3


def test_model_info_reports_lora_parameters(capsys):
    assert cli_main(["model-info", "kimi-k2-instruct", "--lora-rank", "16", "--no-mlp", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = preset_config("kimi-k2-instruct")
    D, H, L, V, r = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.vocab_size, 16
    per_layer = ((D + cfg.q_lora_rank) + (cfg.q_lora_rank + H * cfg.qk_head_dim)  # q_a, q_b
                 + (D + cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv_a
                 + (cfg.kv_lora_rank + H * (cfg.qk_nope_head_dim + cfg.v_head_dim))  # kv_b
                 + (H * cfg.v_head_dim + D))  # o
    assert result["lora_parameters"] == r * (L * per_layer + D + V)  # attention of every layer + lm_head
    assert abs(result["parameters"] / 1.02641e12 - 1) < 1e-3
    assert 32e9 < result["active_parameters"] < 34e9


def test_model_info_says_how_the_routed_experts_multiply():
    """From a shell: the implementation a model resolves to when built, for the default and an explicit request,
    and a request the model's shapes cannot take as a one-line error."""
    from jtinker.cli import MOE_IMPLS
    from models.layers.moe_impl import REQUESTS

    assert sorted(MOE_IMPLS) == sorted(REQUESTS)
    seen = {}
    for requested in ("auto", "pallas"):
        proc = subprocess.run([sys.executable, "-m", "jtinker", "model-info", "tiny-qwen3-moe", "--moe-impl", requested,
                               "--json"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        seen[requested] = json.loads(proc.stdout.strip().splitlines()[-1])["moe_impl"]
        assert f"routed experts multiply with: {seen[requested]}" in proc.stdout
    assert seen == {"auto": "loop", "pallas": "mosaic_tpu"}  # CPU: the loop gmm; the TPU kernel, interpreted
    proc = subprocess.run([sys.executable, "-m", "jtinker", "model-info", "tiny-qwen3-moe", "--quant", "int4",
                           "--moe-impl", "triton"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: ValueError: MoE implementation 'triton' cannot run this model's experts: "
                                   "INT4 nibble planes of 8 rows are too small for Triton dots (need a power of two "
                                   ">= 16)"), proc.stderr


def test_model_info_weighs_experts_in_the_format_asked_for(capsys):
    """`--quant fp8` keeps a Qwen3 preset's routed experts as one byte a weight plus a 4-byte scale per 128x128
    block; every other weight stays bf16."""
    sizes = {}
    for quant in ("auto", "fp8"):
        assert cli_main(["model-info", "qwen3-30b-a3b", "--quant", quant, "--json"]) == 0
        sizes[quant] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    auto, fp8 = sizes["auto"], sizes["fp8"]
    experts = auto["routed_expert_parameters"]
    assert auto["parameters"] == fp8["parameters"] and auto["weight_bytes"] == 2 * auto["parameters"]
    assert fp8["weight_bytes"] == auto["weight_bytes"] - 2 * experts + experts * (1 + 4 / 128**2)


def test_bench_train_matmul_floor_covers_every_frozen_weight_forward_and_backward():
    """The matmul floor that `jtinker bench train` reports is the sum over `_frozen_matmuls`: those must be each
    active frozen matrix of the model twice per token (forward and input gradient), plus attention's products,
    counted against the parameters of the model as built."""
    from jtinker.bench_train import _frozen_matmuls

    spec = load_preset("small-qwen3-moe")["hf_config"]
    tokens, seq_len = 2048, 256
    dots = _frozen_matmuls(spec, tokens, seq_len)
    flops = {name: 2 * count * int(np.prod(lhs)) * rhs[-1] for name, count, lhs, rhs in dots}
    model = create_abstract_model(preset_config("small-qwen3-moe"))
    not_matmul = sum(int(np.prod(v.get_value().shape)) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                     if "embed_tokens" in path or any("norm" in str(p) for p in path))
    matmul_active = parameter_counts(model)["active"] - not_matmul
    weight_flops = sum(f for name, f in flops.items() if not name.startswith("attention"))
    assert weight_flops == 2 * 2 * tokens * matmul_active
    L, H, K = spec["num_hidden_layers"], spec["num_attention_heads"], spec["head_dim"]
    attention = sum(f for name, f in flops.items() if name.startswith("attention"))
    assert attention == 12 * L * H * K * seq_len * tokens  # fwd QK and PV, twice each backward (full, not causal)
    assert _frozen_matmuls({**spec, "model_type": "deepseek_v3"}, tokens, seq_len) is None


def test_every_parameter_has_logical_axes_and_a_sharded_run_matches():
    from models.lora import init_adapter_slot, lora_modules

    cfg = preset_config("tiny-qwen3-moe")
    model = create_model(cfg, lora=LoraConfig(num_slots=3, max_rank=4), dtype="float32")
    for slot in (1, 2):  # live adapters, so the sharded LoRA paths add something
        init_adapter_slot(model, slot, rank=4, alpha=8.0, seed=slot)
    for i, (_, mod) in enumerate(lora_modules(model)):
        mod.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), mod.lora_b.shape)
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("fsdp", "expert", "tensor"))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        axes = var.get_metadata("axes")
        assert len(axes) == var.get_value().ndim, path
    shardings = jax.tree.map(
        lambda var: NamedSharding(mesh, spec_for(var.get_value().shape, var.get_metadata("axes"), mesh)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    sharded_state = jax.device_put(state, shardings)
    expert_weight = sharded_state["segments"][0]["mlp"]["experts"]["gate_proj"].get_value()
    assert len(expert_weight.sharding.device_set) == 8
    ids = jax.random.randint(jax.random.key(0), (4, 12), 0, cfg.vocab_size)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids, adapter_ids_B=jnp.array([0, 1, 2, 0])))
    np.testing.assert_allclose(np.asarray(forward(sharded_state, ids)), np.asarray(forward(state, ids)),
                               atol=1e-5, rtol=0)


def test_tiny_vl_preset_runs_with_an_image():
    from models.image_processing import num_image_tokens, preprocess_images
    from models.qwen3_vl_moe import mrope_positions
    from jtinker.compare_torch import sample_images

    cfg = preset_config("tiny-qwen3-vl-moe")
    model = create_model(cfg, dtype="float32")
    pixels, grids = preprocess_images(sample_images(1))
    grid = tuple(int(v) for v in grids[0])
    ids = np.array([[5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * num_image_tokens(grid)
                    + [cfg.vision_end_token_id, 7]])
    mask = np.ones_like(ids)
    positions = mrope_positions(ids, mask, (grid,), cfg)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, pix: nnx.merge(graphdef, s)(
        jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask), positions_BT=jnp.asarray(positions),
        pixel_values=pix, image_grid_thw=(grid,)))
    with_image = forward(state, jnp.asarray(pixels))
    other_image = forward(state, jnp.asarray(pixels[::-1]))
    assert with_image.shape == (1, ids.shape[1], cfg.vocab_size) and bool(jnp.all(jnp.isfinite(with_image)))
    assert float(jnp.abs(with_image[0, -1] - other_image[0, -1]).max()) > 1e-4  # the pixels reach the text
