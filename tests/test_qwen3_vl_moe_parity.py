"""Qwen3-VL-MoE logits against transformers' Qwen3VLMoeForConditionalGeneration, live, with 0, 1 and 3 images
of different aspect ratios (the same pixel values fed to both), through the compare-torch code path."""

import numpy as np
import pytest
import torch

from jtinker.compare_torch import TorchRunner, compare, make_vl_inputs
from models.config import load_config
from models.qwen3_vl_moe import mrope_positions


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_fp32_logits_and_routing_match_transformers(vl_checkpoint, num_images):
    result = compare(vl_checkpoint("vl_base"), dtype="float32", num_images=num_images)
    assert result["images"] == num_images
    assert result["max_abs_logit_diff"] <= 1e-5, result
    assert result["router_agreement"] == 1.0 and result["top1_agreement"] == 1.0, result


def test_images_have_different_aspect_ratios_and_shape_the_positions(vl_checkpoint):
    model_dir = vl_checkpoint("vl_base")
    cfg = load_config(model_dir)
    inputs = make_vl_inputs(model_dir, cfg, num_images=3)
    assert len({h / w for _, h, w in inputs.image_grid_thw}) == 3
    # jtinker's M-RoPE positions are transformers' get_rope_index, and text after an image jumps ahead
    runner = TorchRunner(model_dir, "float32")
    token_types = torch.from_numpy((inputs.input_ids == cfg.image_token_id).astype(np.int64))
    expected, _ = runner.model.model.get_rope_index(
        torch.from_numpy(inputs.input_ids), token_types, torch.tensor(inputs.image_grid_thw), None,
        torch.from_numpy(inputs.attention_mask))
    assert np.array_equal(mrope_positions(inputs.input_ids, inputs.attention_mask, inputs.image_grid_thw, cfg),
                          expected.numpy())
    assert inputs.positions[0, 0].max() < inputs.attention_mask[0].sum() - 1  # images advance by max(h, w)/2


def test_bf16_deviation_within_twice_transformers_own(vl_checkpoint):
    result = compare(vl_checkpoint("vl_base"), dtype="bfloat16", num_images=3)
    assert result["max_abs_logit_diff"] <= 2 * result["torch_bf16_max_abs_logit_diff"], result
    assert result["mean_abs_logit_diff"] <= 2 * result["torch_bf16_mean_abs_logit_diff"], result
    assert result["passed"]
