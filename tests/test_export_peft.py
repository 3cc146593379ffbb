"""`jtinker export-peft`: a saved adapter loaded by Hugging Face PEFT onto the transformers model gives jtinker's
fp32 logits with that adapter (attention, dense MLP, shared and routed experts, unembedding)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jtinker as tinker
from jtinker.cli import main
from jtinker.compare_torch import FP32_TOLERANCE, TorchRunner, make_inputs


def _randomise_slot(trainer, slot: int, rank: int, seed: int) -> None:
    """Random A and B within the slot's rank (zero beyond it), so every exported factor matters."""
    rng = np.random.default_rng(seed)
    lora = {}
    for path, array in trainer.lora.items():
        axis = trainer.slot_axes[path]
        shape = array.shape[:axis] + array.shape[axis + 1:]
        value = rng.normal(0.0, 0.05, shape)
        within = np.arange(shape[-1] if path[-1] == "lora_a" else shape[-2]) < rank
        value = value * (within if path[-1] == "lora_a" else within[:, None])
        lora[path] = jax.lax.dynamic_update_index_in_dim(array, jnp.asarray(value, array.dtype), slot, axis)
    trainer.lora = lora


def _jtinker_logits(model, inputs, slots) -> list[np.ndarray]:
    """Logits for the same inputs under each adapter slot, in one compiled call."""
    graphdef, state = nnx.split(model)

    def forward(state, ids, mask, positions, adapter_ids):
        return nnx.merge(graphdef, state)(ids, attention_mask_BT=mask, positions_BT=positions, adapter_ids_B=adapter_ids)

    tiled = [jnp.asarray(np.concatenate([x] * len(slots)), jnp.int32)
             for x in (inputs.input_ids, inputs.attention_mask, inputs.positions)]
    adapter_ids = jnp.asarray(np.repeat(slots, len(inputs.input_ids)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(forward)(state, *tiled, adapter_ids)
    return np.split(np.asarray(logits, np.float64), len(slots))


def _export_and_compare(hf_dir, tmp_path, rank: int, export, sampler: bool = False, **lora_kwargs):
    """A random adapter saved through the in-process client (training state, or sampler weights), exported and
    loaded with PEFT. Returns (max |PEFT - jtinker|, max |jtinker adapter - base|, adapter_config, tensor names)."""
    from peft import PeftModel, get_peft_model_state_dict

    service = tinker.ServiceClient(state_dir=tmp_path / "state", num_slots=3, max_rank=4)
    client = service.create_lora_training_client(base_model=str(hf_dir), rank=rank, seed=1, **lora_kwargs)
    trainer = client.engine.trainer
    _randomise_slot(trainer, client.slot, rank, seed=rank)
    save = client.save_weights_for_sampler if sampler else client.save_state
    path = save("export").result().path
    assert ("/sampler_weights/" if sampler else "/weights/") in path
    out = tmp_path / "peft"
    export(path, out, service.state_dir)

    cfg = client.engine.model.config
    inputs = make_inputs(cfg.vocab_size, batch=3, seq_len=12, seed=3)
    model = trainer.model()
    ours, base = _jtinker_logits(model, inputs, [client.slot, 0])

    runner = TorchRunner(hf_dir, "float32")
    runner.model = PeftModel.from_pretrained(runner.model, out).eval()
    theirs, _ = runner.run(inputs)
    written = set(load_file(out / "adapter_model.safetensors"))
    # every tensor PEFT expects is in the file and nothing else (PEFT only warns about missing adapter keys)
    assert written == set(get_peft_model_state_dict(runner.model, save_embedding_layers=False))
    valid = inputs.attention_mask.astype(bool)
    config = json.loads((out / "adapter_config.json").read_text())
    return (float(np.abs(theirs - ours)[valid].max()), float(np.abs(ours - base)[valid].max()), config, written)


def _export_with_function(path, out, state_dir):
    from jtinker.export_peft import export_peft

    export_peft(path, out, state_dir=state_dir)


def _export_with_cli(path, out, state_dir):
    assert main(["export-peft", path, str(out), "--state-dir", str(state_dir), "--json"]) == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PEFT's pattern-key check ignores target_parameters
def test_qwen3_moe_adapter_below_max_rank_through_peft(hf_checkpoint, tmp_path, capsys):
    """MoE, dense, MoE layers; rank 3 of max 4; every group trained; exported through the CLI."""
    hf_dir = hf_checkpoint("export_qwen3_moe", seed=5, mlp_only_layers=[1])
    diff, effect, config, written = _export_and_compare(hf_dir, tmp_path, 3, _export_with_cli)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rank"] == 3 and summary["lora_alpha"] == 32
    print(f"qwen3-moe: max |PEFT - jtinker| {diff:.2e}, adapter effect {effect:.2f}")
    assert effect > 0.1
    assert diff <= FP32_TOLERANCE
    assert config["r"] == 3 and config["lora_alpha"] == 32
    assert config["rank_pattern"] == {"experts.gate_up_proj": 6}
    assert config["alpha_pattern"] == {"experts.gate_up_proj": 64}
    assert sorted(config["target_modules"]) == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    assert sorted(config["target_parameters"]) == ["down_proj.weight", "experts.down_proj", "experts.gate_up_proj",
                                                   "gate_proj.weight", "up_proj.weight"]
    assert "base_model.model.model.layers.2.mlp.experts.base_layer.lora_A.weight" in written
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight" in written  # the dense layer


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kimi_adapter_with_tied_unembedding_without_attention_through_peft(deepseek_checkpoint, tmp_path):
    """DeepSeek-V3 / Kimi K2 (dense layer, shared and routed experts) with tied embeddings, whose unembedding
    LoRA becomes PEFT's lm_head LoRA; the attention group (not trained: scale 0) is left out of the adapter;
    exported from sampler weights."""
    hf_dir = deepseek_checkpoint("export_kimi_tied", seed=2, num_hidden_layers=2, tie_word_embeddings=True)
    diff, effect, config, written = _export_and_compare(hf_dir, tmp_path, 2, _export_with_function, sampler=True,
                                                        train_attn=False)
    print(f"kimi: max |PEFT - jtinker| {diff:.2e}, adapter effect {effect:.2f}")
    assert effect > 0.1
    assert diff <= FP32_TOLERANCE
    assert config["target_modules"] == ["lm_head"] and not any("attn" in k for k in written)
    assert sorted(config["target_parameters"]) == ["down_proj.weight", "experts.down_proj", "experts.gate_up_proj",
                                                   "gate_proj.weight", "up_proj.weight"]
    for module in ("layers.0.mlp.gate_proj", "layers.1.mlp.shared_experts.down_proj", "layers.1.mlp.experts"):
        assert f"base_model.model.model.{module}.lora_A.weight" in written


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["export-peft", "tinker://run/weights/nope", str(tmp_path / "out"),
                 "--state-dir", str(tmp_path)]) == 2
    assert main(["export-peft", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "tinker://run/weights/nope" in err[0] and "not a jtinker checkpoint" in err[1]
