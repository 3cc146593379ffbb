"""Hugging Face checkpoint loading: layouts that must load, and malformed input that must fail in one line."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jtinker.cli import main as cli_main
from jtinker.compare_torch import jtinker_forward, make_inputs
from models.config import ConfigError, load_config
from models.hf_loading import load_hf_model
from models.safetensors_io import CheckpointError

# hidden 32 != 2 x moe_intermediate 12, so the fused expert layouts are unambiguous.
BASE = dict(moe_intermediate_size=12)


@pytest.fixture(scope="module")
def base_dir(hf_checkpoint):
    return hf_checkpoint("loading_base", **BASE)


@pytest.fixture
def ckpt_copy(base_dir, tmp_path):
    """A writable copy of the base checkpoint: (folder, its tensors as numpy, its config dict)."""
    out = tmp_path / "ckpt"
    shutil.copytree(base_dir, out)
    return out, load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())


def _rewrite(folder, tensors=None, config=None):
    if tensors is not None:
        save_file(tensors, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def _fuse_experts(tensors, cfg, original_layout: bool):
    """Per-expert tensors -> fused gate_up_proj/down_proj (transformers-5 layout, or Qwen3-VL's original)."""
    out = dict(tensors)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        gate = [out.pop(f"{p}.{e}.gate_proj.weight") for e in range(cfg["num_local_experts"])]
        up = [out.pop(f"{p}.{e}.up_proj.weight") for e in range(cfg["num_local_experts"])]
        down = [out.pop(f"{p}.{e}.down_proj.weight") for e in range(cfg["num_local_experts"])]
        gate_up = np.stack([np.concatenate([g, u], axis=0) for g, u in zip(gate, up)])  # [E, 2F, D]
        down = np.stack(down)  # [E, D, F]
        if original_layout:
            gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
        out[f"{p}.gate_up_proj"] = np.ascontiguousarray(gate_up)
        out[f"{p}.down_proj"] = np.ascontiguousarray(down)
    return out


@pytest.mark.parametrize("original_layout", [False, True], ids=["transformers5_fused", "qwen3vl_original_fused"])
@pytest.mark.parametrize("expert_size", [12, 16], ids=["unambiguous", "hidden_equals_2F"])
def test_fused_expert_layouts_load_identically(hf_checkpoint, tmp_path, original_layout, expert_size):
    base_dir = hf_checkpoint(f"loading_F{expert_size}", moe_intermediate_size=expert_size)
    folder = tmp_path / "fused"
    shutil.copytree(base_dir, folder)
    tensors, config = load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())
    _rewrite(folder, _fuse_experts(tensors, config, original_layout))
    inputs = make_inputs(config["vocab_size"])
    fused_logits, fused_routed = jtinker_forward(folder, "float32", inputs)
    logits, routed = jtinker_forward(base_dir, "float32", inputs)
    assert np.array_equal(fused_logits, logits) and np.array_equal(fused_routed, routed)


def _one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_tensor(ckpt_copy):
    folder, tensors, _ = ckpt_copy
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf_model(folder)
    _one_line_error(e, "missing tensor", "'model.layers.1.self_attn.k_proj.weight'", "[16, 32]")


def test_unexpected_tensor(ckpt_copy):
    folder, tensors, _ = ckpt_copy
    tensors["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((3, 4), np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf_model(folder)
    _one_line_error(e, "unexpected tensor", "'model.layers.0.self_attn.extra_proj.weight'", "[3, 4]")


def test_misshaped_tensor(ckpt_copy):
    folder, tensors, _ = ckpt_copy
    tensors["model.layers.2.mlp.experts.5.down_proj.weight"] = np.zeros((32, 13), np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf_model(folder)
    _one_line_error(e, "'model.layers.2.mlp.experts.5.down_proj.weight'", "expected shape [32, 12]", "found [32, 13]")


def test_truncated_file(ckpt_copy):
    folder, _, _ = ckpt_copy
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as e:
        load_hf_model(folder)
    _one_line_error(e, "model.safetensors", "truncated")


def test_unknown_model_type(ckpt_copy):
    folder, _, config = ckpt_copy
    _rewrite(folder, config={**config, "model_type": "llama9"})
    with pytest.raises(ConfigError) as e:
        load_hf_model(folder)
    _one_line_error(e, "unknown model_type 'llama9'", "qwen3_moe")


@pytest.mark.parametrize("field,value,fragments", [
    ("hidden_size", None, ["missing field 'hidden_size'"]),
    ("num_hidden_layers", "three", ["'num_hidden_layers' expected int", "'three'"]),
    ("num_key_value_heads", 3, ["'num_key_value_heads'", "divisor of num_attention_heads (4)", "found 3"]),
])
def test_malformed_config(ckpt_copy, field, value, fragments):
    folder, _, config = ckpt_copy
    config = dict(config)
    if value is None:
        del config[field]
    else:
        config[field] = value
    _rewrite(folder, config=config)
    with pytest.raises(ConfigError) as e:
        load_config(folder)
    _one_line_error(e, *fragments)


def test_cli_reports_a_malformed_checkpoint_in_one_line(ckpt_copy, capsys):
    folder, tensors, _ = ckpt_copy
    del tensors["lm_head.weight"]
    _rewrite(folder, tensors)
    assert cli_main(["compare-torch", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing tensor 'lm_head.weight'" in err


def test_loaded_weights_are_the_checkpoint_weights(base_dir):
    """Spot-check the name mapping: a kernel is the transposed torch weight, experts stack per expert."""
    from flax import nnx

    model = load_hf_model(base_dir)
    tensors = load_file(base_dir / "model.safetensors")
    cfg = load_config(base_dir)
    state = dict(nnx.to_flat_state(nnx.state(model)))
    q = np.asarray(state[("segments", 0, "self_attn", "q_proj", "kernel")].get_value())
    assert np.array_equal(q[2], tensors["model.layers.2.self_attn.q_proj.weight"].T)
    down = np.asarray(state[("segments", 0, "mlp", "experts", "down_proj")].get_value())
    assert np.array_equal(down[1, 3], tensors["model.layers.1.mlp.experts.3.down_proj.weight"].T)
    assert down.shape == (cfg.num_hidden_layers, cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size)
