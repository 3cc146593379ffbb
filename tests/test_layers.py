"""Rotary embeddings against transformers' own implementations, live: default, YaRN and Qwen3-VL M-RoPE."""

import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRotaryEmbedding

from models.layers.rope import RopeConfig, inv_freq_and_attention_factor, rope_cos_sin

YARN_CASES = {
    "qwen_long_context": dict(head_dim=16, max_pos=256, rope={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 4.0, "original_max_position_embeddings": 32}),
    "kimi_k2": dict(head_dim=64, max_pos=131072, rope={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                                        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                                                        "mscale_all_dim": 1.0,
                                                        "original_max_position_embeddings": 4096}),
    "mscale_untruncated": dict(head_dim=32, max_pos=8192, rope={"rope_type": "yarn", "rope_theta": 1e6,
                                                                 "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                                                                 "truncate": False,
                                                                 "original_max_position_embeddings": 1024}),
}


def _hf_config(head_dim, max_pos, rope):
    return Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                          max_position_embeddings=max_pos, rope_parameters=dict(rope))


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_frequencies_match_transformers(case):
    c = YARN_CASES[case]
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(c["head_dim"], c["max_pos"], c["rope"]))
    inv_freq, factor = inv_freq_and_attention_factor(RopeConfig.from_hf(c["rope"], c["max_pos"]), c["head_dim"],
                                                     c["max_pos"])
    np.testing.assert_allclose(inv_freq, expected_inv_freq.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-7)


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 1e6}, YARN_CASES["qwen_long_context"]["rope"]])
def test_cos_sin_match_transformers(rope):
    hf = _hf_config(16, 256, rope)
    positions = np.random.default_rng(0).integers(0, 256, size=(2, 7))
    cos_ref, sin_ref = Qwen3MoeRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
    inv_freq, factor = inv_freq_and_attention_factor(RopeConfig.from_hf(rope, 256), 16, 256)
    cos, sin = rope_cos_sin(positions, inv_freq, factor, np.float32)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=2e-6, rtol=0)


def test_mrope_matches_qwen3_vl():
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    hf = Qwen3VLMoeTextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=dict(rope))
    positions = np.random.default_rng(1).integers(0, 100, size=(3, 2, 9))  # distinct T, H, W positions
    cos_ref, sin_ref = Qwen3VLMoeTextRotaryEmbedding(hf)(torch.zeros(1), torch.from_numpy(positions))
    cfg = RopeConfig.from_hf(rope, 262144)
    inv_freq, factor = inv_freq_and_attention_factor(cfg, 16, 262144)
    cos, sin = rope_cos_sin(positions, inv_freq, factor, np.float32, mrope_section=cfg.mrope_section)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=2e-6, rtol=0)
    # and it is not plain 1D rope over the temporal row
    cos_1d, _ = rope_cos_sin(positions[0], inv_freq, factor, np.float32)
    assert np.abs(np.asarray(cos_1d) - cos_ref.numpy()).max() > 0.1


def test_unsupported_rope_type_is_one_line():
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        RopeConfig.from_hf({"rope_type": "dynamic", "factor": 2.0}, 4096)


def test_causal_query_blocks_match_transformers_eager_attention():
    """Training/prefill attention skips the keys after each query block; it must still equal transformers'
    eager attention over all keys (GQA, causal mask with left padding)."""
    import jax.numpy as jnp
    from types import SimpleNamespace

    from transformers.models.qwen3_moe.modeling_qwen3_moe import eager_attention_forward

    from models.layers.attention import CAUSAL_QUERY_BLOCKS, attention_mask, dot_product_attention

    B, T, H, G, K = 2, 64 * CAUSAL_QUERY_BLOCKS, 4, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, n, K)).astype(np.float32) for n in (H, G, G))
    valid = np.ones((B, T), np.int32)
    valid[1, :37] = 0  # left padding
    mask = np.asarray(attention_mask(jnp.asarray(valid), T))
    ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), K**-0.5,
                                 causal=True)
    additive = torch.from_numpy(np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32))[:, None]
    module = SimpleNamespace(num_key_value_groups=H // G, training=False)
    theirs, _ = eager_attention_forward(module, *(torch.from_numpy(a).transpose(1, 2) for a in (q, k, v)),
                                        additive, scaling=K**-0.5)
    real = valid.astype(bool)  # fully masked (padding) query rows are undefined in both
    np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], atol=2e-6, rtol=0)
