"""DeepSeek-V3 / Kimi K2 logits against transformers' DeepseekV3ForCausalLM, live (compare-torch code path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtinker.compare_torch import compare
from models.config import load_config

VARIANTS = {
    # Kimi K2: model_type kimi_k2, one group, YaRN factor 32 with beta 1/1, interleaved rope, one dense layer
    "kimi_style": dict(model_type="kimi_k2"),
    # DeepSeek-V3: group-limited routing (4 groups of 2, best 2 groups), DSV3's YaRN
    "dsv3_grouped": dict(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                          "original_max_position_embeddings": 16}),
    # no q_lora_rank (q_proj), non-interleaved default rope, unnormalised top-k weights
    "no_q_lora_plain_rope": dict(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # two leading dense layers and two shared experts
    "two_dense_two_shared": dict(num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fp32_logits_and_routing_match_transformers(deepseek_checkpoint, name):
    model_dir = deepseek_checkpoint(name, **VARIANTS[name])
    result = compare(model_dir, dtype="float32", seq_len=20)
    assert result["max_abs_logit_diff"] <= 1e-5, result
    assert result["router_agreement"] == 1.0 and result["top1_agreement"] == 1.0, result


def test_variants_are_what_they_claim(deepseek_checkpoint):
    cfgs = {name: load_config(deepseek_checkpoint(name, **VARIANTS[name])) for name in VARIANTS}
    assert cfgs["kimi_style"].model_type == "kimi_k2"
    assert (cfgs["dsv3_grouped"].n_group, cfgs["dsv3_grouped"].topk_group) == (4, 2)
    assert cfgs["no_q_lora_plain_rope"].q_lora_rank is None and not cfgs["no_q_lora_plain_rope"].rope_interleave
    assert cfgs["two_dense_two_shared"].layer_kinds() == [False, False, True, True]


def test_bf16_deviation_within_twice_transformers_own(deepseek_checkpoint):
    result = compare(deepseek_checkpoint("dsv3_grouped", **VARIANTS["dsv3_grouped"]), dtype="bfloat16", seq_len=20)
    assert result["max_abs_logit_diff"] <= 2 * result["torch_bf16_max_abs_logit_diff"], result
    assert result["mean_abs_logit_diff"] <= 2 * result["torch_bf16_mean_abs_logit_diff"], result
    assert result["passed"]


@pytest.mark.parametrize("name", ["kimi_style", "no_q_lora_plain_rope"])
def test_latent_cache_attention_equals_full_attention(deepseek_checkpoint, name):
    """Decoding from the cached latent + rope key with absorbed up-projections gives the same attention output
    as expanding keys and values per head, with LoRA adapters (non-zero) on every projection."""
    from models.hf_loading import load_hf_model
    from models.layers.attention import attention_mask
    from models.layers.rope import inv_freq_and_attention_factor, rope_cos_sin
    from models.lora import LoraConfig, init_adapter_slot, lora_modules

    model = load_hf_model(deepseek_checkpoint(name, **VARIANTS[name]), dtype="float32",
                          lora=LoraConfig(num_slots=3, max_rank=4))
    init_adapter_slot(model, 1, rank=4, alpha=8.0, seed=0)
    for i, (_, mod) in enumerate(lora_modules(model)):
        mod.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(i), mod.lora_b.shape)
    cfg = model.config
    stack = model.segments[1]
    graphdef, state = nnx.split(stack)
    attn = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).self_attn
    B, T = 2, 9
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size))
    valid = jnp.array([[1] * T, [1] * 6 + [0] * 3])
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    inv_freq, factor = inv_freq_and_attention_factor(cfg.rope, cfg.rope_dim, cfg.max_position_embeddings)
    cos, sin = rope_cos_sin(positions, inv_freq, factor, jnp.float32)
    mask = attention_mask(valid, T)
    slots = jnp.array([1, 0])
    full = attn(x, cos, sin, mask, slots)
    latent, k_rope = attn.latent_kv(x, cos, sin, slots)
    assert latent.shape == (B, T, cfg.kv_lora_rank) and k_rope.shape == (B, T, cfg.qk_rope_head_dim)
    absorbed = attn.attend_latent(x, cos, sin, latent, k_rope, mask, slots)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(full), atol=1e-5, rtol=0)
    # the last token alone against the cache of all tokens (one decode step)
    step = attn.attend_latent(x[:, -1:], cos[:, -1:], sin[:, -1:], latent, k_rope, mask[:, -1:], slots)
    np.testing.assert_allclose(np.asarray(step[0]), np.asarray(full[0, -1:]), atol=1e-5, rtol=0)


def test_multi_token_prediction_layer_is_ignored(deepseek_checkpoint, tmp_path):
    """DeepSeek-V3 checkpoints carry an MTP layer numbered after the last decoder layer; it is not built."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from jtinker.compare_torch import JtinkerRunner, make_inputs

    base = deepseek_checkpoint("kimi_style", **VARIANTS["kimi_style"])
    folder = tmp_path / "with_mtp"
    shutil.copytree(base, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name]
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    tensors["model.layers.3.enorm.weight"] = np.ones(32, np.float32)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    inputs = make_inputs(96)
    assert np.array_equal(JtinkerRunner(folder, "float32").run(inputs)[0], JtinkerRunner(base, "float32").run(inputs)[0])
