"""Vocab-chunked target log-probs equal a full log-softmax, values and LoRA gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_hf_config
from models.config import config_from_hf_dict
from models.lora import LoraConfig, LoRAParam, init_adapter_slot, lora_modules
from models.registry import create_model


@pytest.fixture(scope="module", params=["untied", "tied"])
def model(request):
    cfg = config_from_hf_dict(tiny_hf_config(vocab_size=97, tie_word_embeddings=request.param == "tied"))
    m = create_model(cfg, lora=LoraConfig(num_slots=3, max_rank=4), dtype="float32")
    init_adapter_slot(m, 1, rank=4, alpha=8.0, seed=0)
    for i, (_, mod) in enumerate(lora_modules(m)):
        mod.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), mod.lora_b.shape)
    return m


IDS = jax.random.randint(jax.random.key(1), (2, 7), 0, 97)
TARGETS = jax.random.randint(jax.random.key(2), (2, 7, 3), 0, 97).at[0, 0, 0].set(96).at[1, 2, 1].set(0)
SLOTS = jnp.array([1, 0])


@pytest.mark.parametrize("chunk_size", [16, 32, 97, 500])  # 97 = 6 x 16 + 1: the last chunk overlaps
def test_chunked_equals_full_log_softmax(model, chunk_size):
    graphdef, state = nnx.split(model)

    def both(state):
        m = nnx.merge(graphdef, state)
        h, _ = m.hidden_states(IDS, adapter_ids_B=SLOTS)
        full = jnp.take_along_axis(jax.nn.log_softmax(m.logits(h, SLOTS), axis=-1), TARGETS, axis=-1)
        return m.target_logprobs(h, TARGETS, SLOTS, chunk_size=chunk_size), full

    chunked, full = jax.jit(both)(state)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=2e-6, rtol=0)


def test_lora_gradients_equal_full_log_softmax(model):
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    weights = jax.random.normal(jax.random.key(3), TARGETS.shape)

    def loss(lora, chunked):
        m = nnx.merge(graphdef, lora, rest)
        h, _ = m.hidden_states(IDS, adapter_ids_B=SLOTS)
        lp = (m.target_logprobs(h, TARGETS, SLOTS, chunk_size=16) if chunked else
              jnp.take_along_axis(jax.nn.log_softmax(m.logits(h, SLOTS), axis=-1), TARGETS, axis=-1))
        return jnp.sum(lp * weights)

    g_chunked = jax.jit(jax.grad(lambda l: loss(l, True)))(lora)
    g_full = jax.jit(jax.grad(lambda l: loss(l, False)))(lora)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_chunked), nnx.to_flat_state(g_full)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(b).max()), rtol=0, err_msg=str(path))
    assert any(np.abs(np.asarray(v.get_value())).max() > 0 for _, v in nnx.to_flat_state(g_chunked))
