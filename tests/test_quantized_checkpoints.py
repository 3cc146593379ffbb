"""FP8 (block-scaled) and INT4 (compressed-tensors pack-quantized) checkpoints that the tests quantize
themselves: they load to within the format's rounding, compare-torch works on them, corruption is rejected."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jtinker.compare_torch import compare
from models.hf_loading import load_hf_model
from models.layers.quantized import Fp8Weight, Int4Weight
from models.lora import LoraConfig, LoRAParam, init_adapter_slot, lora_modules
from models.safetensors_io import Checkpoint, CheckpointError

BLOCK = (16, 16)  # smaller than DeepSeek's 128x128 so the tiny tensors have several, ragged, blocks
GROUP = 32
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK), "activation_scheme": "dynamic"}
INT4_CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                   "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}}},
               "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"]}


def quantize_fp8(w):
    """Per-block scale = max|w| / 448 (e4m3's largest normal); returns (float8 weight, fp32 scale_inv)."""
    rows, cols = math.ceil(w.shape[0] / BLOCK[0]), math.ceil(w.shape[1] / BLOCK[1])
    q, scale = np.empty(w.shape, ml_dtypes.float8_e4m3fn), np.ones((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            blk = (slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1]))
            scale[i, j] = max(np.abs(w[blk]).max() / 448.0, 1e-12)
            q[blk] = (w[blk] / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize_fp8_reference(q, scale):
    out = q.astype(np.float32)
    for (i, j), s in np.ndenumerate(scale):
        out[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] *= s
    return out


def quantize_int4(w):
    """Symmetric groups of 32 columns: q = round(w / s) in [-8, 7] with s = max|w| / 7 (bf16), packed 8 per int32."""
    out, cols = w.shape
    groups = w.reshape(out, cols // GROUP, GROUP)
    scale = (np.abs(groups).max(axis=-1) / 7.0).astype(ml_dtypes.bfloat16)
    q = np.clip(np.round(groups / scale.astype(np.float32)[..., None]), -8, 7).astype(np.int64).reshape(out, cols)
    nibbles = (q + 8).reshape(out, cols // 8, 8)
    words = np.zeros((out, cols // 8), np.uint64)
    for j in range(8):
        words |= nibbles[..., j].astype(np.uint64) << np.uint64(4 * j)
    return words.astype(np.uint32).view(np.int32), scale, q


@pytest.fixture(scope="module")
def base(deepseek_checkpoint):
    # moe_intermediate 32 so the down projections pack into whole int4 groups of 32 columns
    return deepseek_checkpoint("quant_base", moe_intermediate_size=32)


def _quantized_copy(base, out, tensors, quantization_config):
    shutil.copytree(base, out)
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return out


@pytest.fixture(scope="module")
def fp8_dir(base, tmp_path_factory):
    tensors, quantized = {}, {}
    for name, w in load_file(base / "model.safetensors").items():
        if "proj" in name.split(".")[-2]:  # every linear but the router and lm_head, as in DeepSeek's files
            q, scale = quantize_fp8(w)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            quantized[name] = (q, scale)
        else:
            tensors[name] = w
    out = _quantized_copy(base, tmp_path_factory.mktemp("fp8") / "ckpt", tensors, FP8_CONFIG)
    return out, quantized


@pytest.fixture(scope="module")
def int4_dir(base, tmp_path_factory):
    tensors, quantized = {}, {}
    for name, w in load_file(base / "model.safetensors").items():
        if ".mlp.experts." in name:  # routed experts only, as in Kimi K2 Thinking
            packed, scale, q = quantize_int4(w)
            stem = name[:-len(".weight")]
            tensors.update({f"{stem}.weight_packed": packed, f"{stem}.weight_scale": scale,
                            f"{stem}.weight_shape": np.array(w.shape, np.int64)})
            quantized[name] = (q, scale)
        else:
            tensors[name] = w
    out = _quantized_copy(base, tmp_path_factory.mktemp("int4") / "ckpt", tensors, INT4_CONFIG)
    return out, quantized


def _param(model, *path):
    return np.asarray(dict(nnx.to_flat_state(nnx.state(model)))[path].get_value())


def test_fp8_loads_to_within_rounding(base, fp8_dir):
    folder, quantized = fp8_dir
    model = load_hf_model(folder, dtype="float32")
    original = load_file(base / "model.safetensors")
    checks = [("model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
               ("segments", 1, "self_attn", "kv_a_proj_with_mqa", "kernel"), 0),
              ("model.layers.2.self_attn.q_b_proj.weight", ("segments", 1, "self_attn", "q_b_proj", "kernel"), 1),
              ("model.layers.0.mlp.down_proj.weight", ("segments", 0, "mlp", "down_proj", "kernel"), 0)]
    for name, path, layer in checks:
        loaded = _param(model, *path)[layer].T
        q, scale = quantized[name]
        assert np.array_equal(loaded, dequantize_fp8_reference(q, scale))
        w = original[name]
        block_scale = np.kron(scale, np.ones(BLOCK))[:w.shape[0], :w.shape[1]]
        assert np.all(np.abs(loaded - w) <= 2.0**-4 * np.abs(w) + 2.0**-9 * block_scale), name  # e4m3 rounding
        assert not np.array_equal(loaded, w)  # it really went through float8


def test_fp8_checkpoint_compares_with_torch(fp8_dir):
    result = compare(fp8_dir[0], dtype="float32", seq_len=12)  # FP8 routed experts kept FP8 (the default)
    assert result["max_abs_logit_diff"] <= 1e-5 and result["router_agreement"] == 1.0, result


@pytest.fixture(scope="module")
def qwen3_fp8_dir(hf_checkpoint, tmp_path_factory):
    """A Qwen3-MoE checkpoint quantized as Qwen's FP8 releases are: every projection (attention and each
    expert) FP8 with block scales, the router and lm_head not."""
    base = hf_checkpoint("quant_qwen3", moe_intermediate_size=32)
    tensors, quantized = {}, {}
    for name, w in load_file(base / "model.safetensors").items():
        if name.endswith("proj.weight"):
            q, scale = quantize_fp8(w)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            quantized[name] = (q, scale)
        else:
            tensors[name] = w
    return _quantized_copy(base, tmp_path_factory.mktemp("qwen3_fp8") / "ckpt", tensors, FP8_CONFIG), quantized


def test_qwen3_fp8_checkpoint_keeps_its_experts_fp8_and_compares_with_torch(qwen3_fp8_dir):
    folder, quantized = qwen3_fp8_dir
    model = load_hf_model(folder, dtype="float32")
    experts = model.segments[0].mlp.experts
    assert experts.quant is not None and experts.quant.kind == "fp8"
    for layer, e, proj in ((0, 3, "gate_proj"), (2, 6, "down_proj")):
        w = _experts(model, proj, segment=0)
        assert isinstance(w, Fp8Weight)
        kept = np.asarray(w.take(layer).take(e).dequantize(jnp.float32)).T
        expected = dequantize_fp8_reference(*quantized[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"])
        assert np.array_equal(kept, expected)
    q_proj = _param(model, "segments", 0, "self_attn", "q_proj", "kernel")[1].T  # dequantized on load
    assert np.array_equal(q_proj, dequantize_fp8_reference(*quantized["model.layers.1.self_attn.q_proj.weight"]))
    result = compare(folder, dtype="float32", seq_len=12)
    assert result["max_abs_logit_diff"] <= 1e-5 and result["router_agreement"] == 1.0, result


def test_qwen3_vl_quantization_config_reaches_its_language_model():
    from configs import load_preset
    from jtinker.plan import with_quant
    from models.config import config_from_hf_dict, with_quantization_config

    raw = {**load_preset("tiny-qwen3-vl-moe")["hf_config"], "quantization_config": FP8_CONFIG}
    cfg = config_from_hf_dict(raw)
    assert cfg.expert_quant.kind == "fp8" and cfg.expert_quant.block == BLOCK
    assert with_quantization_config(cfg, None).expert_quant is None
    assert with_quant(cfg, "int4").text.expert_quant.kind == "int4"


def _experts(model, proj, segment: int = 1):
    """The quantized weight a model's stacked experts' (values, scales) parameters stand for."""
    state = dict(nnx.to_flat_state(nnx.state(model)))
    path = ("segments", segment, "mlp", "experts")
    experts = model.segments[segment].mlp.experts
    return experts.quant.weight(state[path + (proj,)].get_value(), state[path + (f"{proj}_scale",)].get_value())


def _expert_bytes(model) -> int:
    return sum(var.get_value().nbytes for path, var in nnx.to_flat_state(nnx.state(model))
               if "experts" in path and path[-1].split("_scale")[0] in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantized_experts_stay_quantized_and_load_to_within_rounding(base, int4_dir, fp8_dir, fmt):
    """Routed experts stay 4-bit / FP8 in memory (the default) and stand for exactly the weights that
    dequantizing on load gives; the other weights are dequantized as before."""
    folder, quantized = int4_dir if fmt == "int4" else fp8_dir
    model = load_hf_model(folder, dtype="float32")
    floats = load_hf_model(folder, dtype="float32", quantized_experts=False)  # dequantized on load
    original = load_file(base / "model.safetensors")
    for layer, e, proj in ((1, 0, "gate_proj"), (2, 7, "down_proj"), (1, 5, "up_proj")):
        name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        q, scale = quantized[name]
        if fmt == "int4":
            scale_cols = np.repeat(scale.astype(np.float32), GROUP, axis=1)
            expected = q * scale_cols
            assert np.all(np.abs(expected - original[name]) <= 0.51 * scale_cols + 2.0**-7 * np.abs(original[name]))
        else:
            expected = dequantize_fp8_reference(q, scale)
        w = _experts(model, proj)
        assert isinstance(w, Int4Weight if fmt == "int4" else Fp8Weight)
        assert w.shape[-2:] == original[name].shape[::-1]
        kept = np.asarray(w.take(layer - 1).take(e).dequantize(jnp.float32)).T
        loaded = _param(floats, "segments", 1, "mlp", "experts", proj)[layer - 1, e].T
        assert np.array_equal(kept, expected) and np.array_equal(loaded, expected)
    # 4 bits + a 32-bit scale per 32 weights, or 8 bits + a 32-bit scale per 16x16 block, against 32-bit floats
    per_weight = 0.5 + 4 / GROUP if fmt == "int4" else 1 + 4 / (BLOCK[0] * BLOCK[1])
    assert _expert_bytes(model) == _expert_bytes(floats) * per_weight / 4
    assert np.array_equal(_param(model, "segments", 1, "self_attn", "o_proj", "kernel"),
                          _param(floats, "segments", 1, "self_attn", "o_proj", "kernel"))
    if fmt == "int4":  # (FP8 has its own compare test above)
        result = compare(folder, dtype="float32", seq_len=12)
        assert result["max_abs_logit_diff"] <= 1e-5 and result["router_agreement"] == 1.0, result


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_lora_on_quantized_experts_trains_like_on_dequantized_ones(int4_dir, fp8_dir, fmt):
    """Expert LoRA (and every other LoRA) gives the same loss and gradients whether the frozen experts are kept
    quantized or dequantized on load: the stacked layers read each layer's quantized experts in place."""
    lora = LoraConfig(num_slots=2, max_rank=4)
    folder = (int4_dir if fmt == "int4" else fp8_dir)[0]
    results = []
    for quantized_experts in (True, False):
        model = load_hf_model(folder, dtype="float32", lora=lora, quantized_experts=quantized_experts)
        assert (model.segments[1].mlp.experts.quant is not None) == quantized_experts
        init_adapter_slot(model, 1, rank=4, alpha=8.0, seed=3)
        for i, (_, mod) in enumerate(lora_modules(model)):  # B = 0 at init would hide the A gradients
            mod.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), mod.lora_b.shape)
        graphdef, params, rest = nnx.split(model, LoRAParam, ...)
        ids = jax.random.randint(jax.random.key(0), (2, 10), 0, model.config.vocab_size)
        slots = jnp.array([1, 0])

        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            h, _ = m.hidden_states(ids, adapter_ids_B=slots)
            return -jnp.mean(m.target_logprobs(h, jnp.roll(ids, -1, axis=1)[..., None], slots))

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (loss_q, grads_q), (loss_f, grads_f) = results
    np.testing.assert_allclose(float(loss_q), float(loss_f), rtol=1e-6)
    flat_q, flat_f = dict(nnx.to_flat_state(grads_q)), dict(nnx.to_flat_state(grads_f))
    assert flat_q.keys() == flat_f.keys() and any("experts" in path for path in flat_q)
    for path in flat_q:
        gq, gf = np.asarray(flat_q[path].get_value()), np.asarray(flat_f[path].get_value())
        np.testing.assert_allclose(gq, gf, atol=1e-6 * max(np.abs(gf).max(), 1e-6), rtol=1e-5, err_msg=str(path))


def _corrupt(folder, tmp_path, edit):
    out = tmp_path / "corrupt"
    shutil.copytree(folder, out)
    ckpt = Checkpoint(out)  # safetensors' numpy loader cannot read float8
    tensors = {name: np.array(ckpt.tensor(name)) for name in ckpt.names()}
    del ckpt
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize("edit,fragments", [
    (lambda t: t["model.layers.1.self_attn.o_proj.weight_scale_inv"].__setitem__((0, 1), np.nan),
     ["'model.layers.1.self_attn.o_proj.weight_scale_inv'", "finite", "nan"]),
    (lambda t: t.__setitem__("model.layers.2.mlp.experts.3.gate_proj.weight_scale_inv", np.ones((3, 3), np.float32)),
     ["'model.layers.2.mlp.experts.3.gate_proj.weight_scale_inv'", "expected shape [2, 2]", "found [3, 3]"]),
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"),
     ["'model.layers.0.mlp.up_proj.weight'", "no 'model.layers.0.mlp.up_proj.weight_scale_inv'"]),
], ids=["nan_scale", "misshaped_scale", "missing_scale"])
def test_corrupt_fp8_is_rejected_in_one_line(fp8_dir, tmp_path, edit, fragments):
    with pytest.raises(CheckpointError) as e:
        load_hf_model(_corrupt(fp8_dir[0], tmp_path, edit), dtype="float32")
    message = str(e.value)
    assert "\n" not in message and all(f in message for f in fragments), message


@pytest.mark.parametrize("edit,fragments", [
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.2.down_proj.weight_packed", np.zeros((32, 3), np.int32)),
     ["'model.layers.1.mlp.experts.2.down_proj.weight_packed'", "expected shape [32, 4]", "found [32, 3]"]),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.2.up_proj.weight_packed", np.zeros((32, 4), np.int64)),
     ["'model.layers.1.mlp.experts.2.up_proj.weight_packed'", "expected dtype int32", "int64"]),
    (lambda t: t.__setitem__("model.layers.2.mlp.experts.1.gate_proj.weight_scale",
                             -np.ones((32, 1), ml_dtypes.bfloat16)),
     ["'model.layers.2.mlp.experts.1.gate_proj.weight_scale'", "non-negative"]),
], ids=["misshaped_packed", "wrong_dtype_packed", "negative_scale"])
def test_corrupt_int4_is_rejected_in_one_line(int4_dir, tmp_path, edit, fragments):
    with pytest.raises(CheckpointError) as e:
        load_hf_model(_corrupt(int4_dir[0], tmp_path, edit), dtype="float32")
    message = str(e.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_int4_unpacking_follows_the_format_definition():
    """compressed-tensors pack-quantized: nibble j of word k is column 8k+j (little-endian), value nibble - 8.
    Hand-written words, independent of the test's own packer."""
    from models.quantization import dequantize_int4, unpack_int4

    words = np.array([[0x76543210, 0xFEDCBA98]], np.uint32).view(np.int32)
    assert unpack_int4(words, 16).tolist() == [list(range(-8, 8))]
    assert unpack_int4(words, 13).tolist() == [list(range(-8, 5))]  # a ragged last word
    scale = np.array([[0.5]], np.float32)  # one group of 32 columns covers all 16
    assert dequantize_int4(words, scale, 16, 32).tolist() == [[0.5 * v for v in range(-8, 8)]]
