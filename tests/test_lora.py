"""Multi-adapter LoRA (attention, dense MLP, shared and routed experts, unembedding) on each model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_deepseek_config, tiny_hf_config, tiny_vl_config
from models.config import config_from_hf_dict
from models.layers.linear import Linear
from models.layers.moe import RoutedExperts
from models.lora import ExpertLoRA, LoraConfig, LoRAParam, init_adapter_slot, lora_modules, slot_axes
from models.registry import create_model

CFG = config_from_hf_dict(tiny_hf_config(mlp_only_layers=[1]))  # MoE, dense, MoE
FAMILIES = {"qwen3_moe": CFG, "deepseek_v3": config_from_hf_dict(tiny_deepseek_config()),  # dense, MoE, MoE
            "qwen3_vl_moe": config_from_hf_dict(tiny_vl_config())}  # the language model of the VL model
LORA = LoraConfig(num_slots=4, max_rank=4)
IDS = jax.random.randint(jax.random.key(0), (4, 10), 0, CFG.vocab_size)


def _forward(model, ids, slots):
    graphdef, state = nnx.split(model)
    return _jitted(graphdef)(state, ids, jnp.asarray(slots, jnp.int32))


_cache = {}


def _jitted(graphdef):
    if graphdef not in _cache:
        _cache[graphdef] = jax.jit(lambda state, ids, slots: nnx.merge(graphdef, state)(ids, adapter_ids_B=slots))
    return _cache[graphdef]


def _randomise_b(model, slot: int, rank: int, seed: int):
    """Give slot `slot` non-zero B factors (within its rank), so the adapter is no longer a no-op."""
    axes = slot_axes(model)
    for i, (path, mod) in enumerate(lora_modules(model)):
        b = mod.lora_b[...]
        index = (slice(None),) * axes[path + ("lora_b",)] + (slot,)
        noise = 0.3 * jax.random.normal(jax.random.key(seed * 1000 + i), b[index].shape)
        noise = jnp.where((jnp.arange(b.shape[-2]) < rank)[:, None], noise, 0.0)
        mod.lora_b[...] = b.at[index].set(noise)


@pytest.fixture(scope="module", params=list(FAMILIES))
def adapted_model(request):
    """Slots 1-3 with ranks 1, 2, 4 and different alphas; all with non-zero B."""
    model = create_model(FAMILIES[request.param], lora=LORA, dtype="float32")
    for slot, (rank, alpha) in zip((1, 2, 3), ((1, 2.0), (2, 8.0), (4, 4.0))):
        init_adapter_slot(model, slot, rank=rank, alpha=alpha, seed=slot)
        _randomise_b(model, slot, rank, seed=slot)
    return model


def test_fresh_adapter_reproduces_base_exactly():
    model = create_model(CFG, lora=LORA, dtype="float32")
    init_adapter_slot(model, 2, rank=4, alpha=8.0, seed=7)
    a = next(m for _, m in lora_modules(model)).lora_a[...]
    assert float(jnp.abs(a[:, 2]).max()) > 0  # A is seeded, not zero
    out = _forward(model, IDS, [0, 2, 0, 2])
    assert np.array_equal(np.asarray(out[0]), np.asarray(_forward(model, IDS, [2, 0, 0, 0])[0]))
    assert np.array_equal(np.asarray(out[1]), np.asarray(_forward(model, IDS, [0, 0, 0, 0])[1]))


def test_nonzero_adapter_changes_logits(adapted_model):
    base = _forward(adapted_model, IDS, [0, 0, 0, 0])
    adapted = _forward(adapted_model, IDS, [1, 2, 3, 3])
    assert np.all(np.abs(np.asarray(adapted - base)).max(axis=(1, 2)) > 1e-3)


def test_mixed_batch_equals_single_adapter_runs(adapted_model):
    mixed = _forward(adapted_model, IDS, [1, 2, 3, 0])
    for row, slot in enumerate([1, 2, 3, 0]):
        alone = _forward(adapted_model, IDS, [slot] * 4)[row]
        np.testing.assert_allclose(np.asarray(mixed[row]), np.asarray(alone), atol=2e-6, rtol=0)


def merge_adapter(model: nnx.Module, slot: int) -> None:
    """Fold slot `slot`'s LoRA into the base weights (W += scale * A @ B), in place; the slot's LoRA is then
    zeroed: the independent definition of what LoRA computes, which the adapter's forward must equal."""
    if getattr(model, "lm_head_lora", None) is not None:
        raise NotImplementedError("merging an unembedding LoRA into tied embeddings is not supported")

    def delta(lora, leading: int):
        index = (slice(None),) * leading + (slot,)
        a, b = lora.lora_a[...][index], lora.lora_b[...][index]
        scale = lora.lora_scale[...][index]
        scale = scale.reshape(scale.shape + (1,) * (a.ndim - scale.ndim))
        return jnp.einsum("...DR,...RF->...DF", a.astype(jnp.float32) * scale, b.astype(jnp.float32)), index

    def zero(lora, index):
        lora.lora_a[...] = lora.lora_a[...].at[index].set(0)
        lora.lora_b[...] = lora.lora_b[...].at[index].set(0)

    for path, mod in list(nnx.iter_graph(model)):
        if isinstance(mod, Linear) and mod.lora is not None:
            d, index = delta(mod.lora, mod.lora.lora_a.get_metadata("axes").index("adapter"))
            mod.kernel[...] = (mod.kernel[...].astype(jnp.float32) + d).astype(mod.kernel.dtype)
            zero(mod.lora, index)
        elif isinstance(mod, RoutedExperts) and mod.gate_lora is not None:
            if mod.quant is not None:
                raise NotImplementedError("merging LoRA into quantized routed experts would requantize them; load "
                                          "the checkpoint with quantized_experts=False to merge")
            for weight, lora in ((mod.gate_proj, mod.gate_lora), (mod.up_proj, mod.up_lora),
                                 (mod.down_proj, mod.down_lora)):
                d, index = delta(lora, lora.lora_a.get_metadata("axes").index("adapter"))
                weight[...] = (weight[...].astype(jnp.float32) + d).astype(weight.dtype)
                zero(lora, index)


def test_adapter_equals_its_merged_weights(adapted_model):
    """LoRA on every target (attention, dense MLP, routed experts, lm_head) computes W + (alpha/r) A B."""
    merged = nnx.clone(adapted_model)
    merge_adapter(merged, 2)
    np.testing.assert_allclose(np.asarray(_forward(merged, IDS, [0] * 4)),
                               np.asarray(_forward(adapted_model, IDS, [2] * 4)), atol=1e-4, rtol=0)


def test_expert_lora_is_applied(adapted_model):
    """Only the routed experts' LoRA on: the adapter still changes the logits."""
    model = nnx.clone(adapted_model)
    for _, mod in lora_modules(model):
        if not isinstance(mod, ExpertLoRA):
            mod.lora_scale[...] = jnp.zeros_like(mod.lora_scale[...])
    diff = _forward(model, IDS, [3] * 4) - _forward(model, IDS, [0] * 4)
    assert float(jnp.abs(diff).max()) > 1e-3


def test_gradients_reach_only_the_used_slots_within_rank(adapted_model):
    graphdef, lora_state, rest = nnx.split(adapted_model, LoRAParam, ...)

    def loss(lora_state):
        model = nnx.merge(graphdef, lora_state, rest)
        return jnp.sum(model(IDS[:2], adapter_ids_B=jnp.asarray([1, 2])) ** 2)

    grads = jax.jit(jax.grad(loss))(lora_state)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g.get_value())
        per_slot = np.moveaxis(g, slot_axes(adapted_model)[path], 0)
        assert np.all(per_slot[0] == 0) and np.all(per_slot[3] == 0), path  # base slot and unused slot
        assert np.abs(per_slot[1:3]).max() > 0, path
        if path[-1] == "lora_b":  # rows past each slot's rank stay zero
            assert np.all(per_slot[1][..., 1:, :] == 0) and np.all(per_slot[2][..., 2:, :] == 0), path
        else:
            assert np.all(per_slot[1][..., 1:] == 0) and np.all(per_slot[2][..., 2:] == 0), path


def test_group_switches():
    model = create_model(CFG, lora=LoraConfig(num_slots=3, max_rank=4, attn=False), dtype="float32")
    groups = {m.group for _, m in lora_modules(model)}
    assert groups == {"mlp", "unembed"}  # no attention LoRA tensors at all
    # Without expert LoRA, a fresh adapter slot still routes and computes exactly like the base model.
    no_mlp = create_model(CFG, lora=LoraConfig(num_slots=3, max_rank=4, mlp=False), dtype="float32")
    assert {m.group for _, m in lora_modules(no_mlp)} == {"attn", "unembed"}
    init_adapter_slot(no_mlp, 2, rank=4, alpha=8.0, seed=0)
    assert np.array_equal(np.asarray(_forward(no_mlp, IDS, [2, 2, 2, 2])), np.asarray(_forward(no_mlp, IDS, [0] * 4)))
    full = create_model(CFG, lora=LORA, dtype="float32")
    init_adapter_slot(full, 1, rank=2, alpha=8.0, seed=0, train_attn=False, train_unembed=False)
    for _, mod in lora_modules(full):
        expected = 4.0 if mod.group == "mlp" else 0.0
        scale = np.asarray(mod.lora_scale[...])
        assert np.all(scale[..., 1] == expected) and np.all(scale[..., 0] == 0), mod.group


def test_bad_slot_and_rank_are_rejected():
    model = create_model(CFG, lora=LORA, dtype="float32")
    with pytest.raises(ValueError, match="slot 0 is the base model"):
        init_adapter_slot(model, 0, rank=2, alpha=4.0, seed=0)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        init_adapter_slot(model, 1, rank=5, alpha=4.0, seed=0)
