"""Qwen3-MoE logits against transformers' Qwen3MoeForCausalLM, live, through the compare-torch code path."""

import numpy as np
import pytest

from jtinker.compare_torch import compare, jtinker_forward, make_inputs
from models.config import load_config

CONFIGS = {
    # fewer key/value heads than query heads, weights of the top-k not renormalised, right padding
    "gqa_unnormalised_topk": (dict(norm_topk_prob=False), "right"),
    # a dense layer in the middle (mlp_only_layers), one key/value head, attention bias, left padding
    "dense_layer_mqa_bias": (dict(mlp_only_layers=[1], num_key_value_heads=1, attention_bias=True), "left"),
    # MoE every second layer (decoder_sparse_step), YaRN rope, tied embeddings, top-3 of 6 experts
    "sparse_step_yarn_tied": (dict(num_hidden_layers=4, decoder_sparse_step=2, tie_word_embeddings=True,
                                   num_experts=6, num_experts_per_tok=3,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 32}), "right"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_and_routing_match_transformers(hf_checkpoint, name):
    overrides, padding = CONFIGS[name]
    model_dir = hf_checkpoint(name, **overrides)
    result = compare(model_dir, dtype="float32", padding=padding, seq_len=20)
    assert result["max_abs_logit_diff"] <= 1e-5, result
    assert result["router_agreement"] == 1.0, result
    assert result["top1_agreement"] == 1.0
    assert result["passed"]


def test_configs_cover_what_they_claim(hf_checkpoint):
    kinds = {name: load_config(hf_checkpoint(name, **CONFIGS[name][0])).layer_kinds() for name in CONFIGS}
    assert kinds["dense_layer_mqa_bias"] == [True, False, True]
    assert kinds["sparse_step_yarn_tied"] == [False, True, False, True]
    # The logits are O(1), so a 1e-5 bound is a real bound.
    model_dir = hf_checkpoint("gqa_unnormalised_topk", **CONFIGS["gqa_unnormalised_topk"][0])
    logits, _ = jtinker_forward(model_dir, "float32", make_inputs(96, seq_len=20))
    assert np.abs(logits).max() > 0.5


def test_bf16_deviation_within_twice_transformers_own(hf_checkpoint):
    model_dir = hf_checkpoint("gqa_unnormalised_topk", **CONFIGS["gqa_unnormalised_topk"][0])
    for seed in range(3):
        result = compare(model_dir, dtype="bfloat16", seq_len=20, seed=seed)
        assert result["max_abs_logit_diff"] <= 2 * result["torch_bf16_max_abs_logit_diff"], result
        assert result["mean_abs_logit_diff"] <= 2 * result["torch_bf16_mean_abs_logit_diff"], result
        assert result["max_abs_logit_diff"] > 1e-4  # it really ran in bf16
        assert result["router_agreement"] >= 0.9  # free-running bf16 routing mostly agrees with fp32
        assert result["passed"]


def test_sharded_checkpoint_with_index_matches(hf_checkpoint):
    model_dir = hf_checkpoint("sharded", save_kwargs={"max_shard_size": "40KB"})
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    result = compare(model_dir, dtype="float32")
    assert result["max_abs_logit_diff"] <= 1e-5 and result["router_agreement"] == 1.0


def test_routing_replay_reproduces_and_overrides_the_router(hf_checkpoint):
    from jtinker.compare_torch import JtinkerRunner

    model_dir = hf_checkpoint("gqa_unnormalised_topk", **CONFIGS["gqa_unnormalised_topk"][0])
    runner = JtinkerRunner(model_dir, "float32")
    inputs = make_inputs(96, seq_len=20)
    logits, routed = runner.run(inputs)
    replayed_logits, replayed_routed = runner.run(inputs, replay_experts=routed)
    np.testing.assert_allclose(replayed_logits, logits, atol=1e-6, rtol=0)
    shifted = (routed + 1) % 8  # a different, valid expert choice
    other_logits, other_routed = runner.run(inputs, replay_experts=shifted)
    assert np.array_equal(other_routed, np.sort(shifted, axis=-1))
    assert np.abs(other_logits - logits).max() > 1e-2
