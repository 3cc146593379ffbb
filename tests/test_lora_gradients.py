"""LoRA gradients through the whole model agree with central finite differences of the training loss.

Directional derivatives along random directions restricted to one LoRA group at a time (attention, dense MLP
and experts, unembedding), for the A and the B factors, on Qwen3-MoE and Kimi K2 / DeepSeek-V3. fp32 with a
loss of O(1) per token: the finite difference is good to ~1e-3 relative, far tighter than any wiring mistake.
Top-k routing is piecewise constant, so the shifted evaluations replay the unshifted expert choice: a routing
flip would otherwise put a jump inside the difference quotient (the gradient is the same either way)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_deepseek_config, tiny_hf_config
from models.config import config_from_hf_dict
from models.lora import LoraConfig, LoRAParam, init_adapter_slot, lora_modules, slot_axes
from models.registry import create_model

FAMILIES = {"qwen3_moe": tiny_hf_config(mlp_only_layers=[1]), "deepseek_v3": tiny_deepseek_config()}


def _group_of(path) -> str:
    names = "/".join(map(str, path))
    if "lm_head" in names:
        return "unembed"
    return "attn" if "self_attn" in names else "mlp"


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request):
    cfg = config_from_hf_dict(FAMILIES[request.param])
    model = create_model(cfg, lora=LoraConfig(num_slots=3, max_rank=4), dtype="float32")
    init_adapter_slot(model, 1, rank=3, alpha=6.0, seed=1)
    axes = slot_axes(model)
    for i, (path, mod) in enumerate(lora_modules(model)):  # non-zero B, so A's gradient is non-zero too
        index = (slice(None),) * axes[path + ("lora_b",)] + (1,)
        b = mod.lora_b[...]
        noise = 0.2 * jax.random.normal(jax.random.key(100 + i), b[index].shape)
        mod.lora_b[...] = b.at[index].set(jnp.where((jnp.arange(b.shape[-2]) < 3)[:, None], noise, 0.0))
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    targets = jnp.roll(ids, -1, axis=1)[..., None]
    slots = jnp.array([1, 1])

    @jax.jit
    def loss(lora, replay=None):
        m = nnx.merge(graphdef, lora, rest)
        h, routed = m.hidden_states(ids, adapter_ids_B=slots, replay_experts=replay)
        return -jnp.mean(m.target_logprobs(h, targets, slots)), routed

    return lora, loss, jax.jit(jax.grad(lambda lora: loss(lora)[0]))


@pytest.mark.parametrize("group", ["attn", "mlp", "unembed"])
@pytest.mark.parametrize("factor", ["lora_a", "lora_b"])
def test_lora_gradient_matches_finite_differences(setup, group, factor):
    lora, loss, grad = setup
    flat = nnx.to_flat_state(lora)
    chosen = [p for p, _ in flat if p[-1] == factor and _group_of(p) == group]
    assert chosen, f"no {factor} in group {group}"
    key = jax.random.key(["attn", "mlp", "unembed"].index(group) * 2 + (factor == "lora_b"))
    direction = {}
    for i, (path, var) in enumerate(flat):
        value = var.get_value()
        if path in chosen:  # slot 1 only, within its rank (beyond it the factors are held at zero)
            v = jax.random.normal(jax.random.fold_in(key, i), value.shape)
            index = [slice(None)] * value.ndim
            mask = jnp.zeros(value.shape).at[tuple(index[:var.get_metadata("axes").index("adapter")] + [1])].set(1.0)
            rank_axis = -1 if factor == "lora_a" else -2
            in_rank = (jnp.arange(value.shape[rank_axis]) < 3).reshape((-1,) + (1,) * (-rank_axis - 1))
            direction[path] = v * mask * in_rank
        else:
            direction[path] = jnp.zeros_like(value)
    # half random, half along the (masked) gradient: random alone can be nearly orthogonal to it
    g = {p: v.get_value() for p, v in nnx.to_flat_state(grad(lora))}
    along = {p: g[p] * (d != 0) for p, d in direction.items()}
    unit = lambda t: {p: x / jnp.sqrt(sum(jnp.sum(y * y) for y in t.values())) for p, x in t.items()}  # noqa: E731
    direction, along = unit(direction), unit(along)
    direction = unit({p: direction[p] + along[p] for p in direction})

    def shifted(eps):
        return nnx.from_flat_state({p: v.replace(v.get_value() + eps * direction[p]) for p, v in flat})

    analytic = float(sum(jnp.sum(g[p] * direction[p]) for p in direction))
    eps = 1e-2
    routed = loss(lora)[1]
    numeric = (float(loss(shifted(eps), routed)[0]) - float(loss(shifted(-eps), routed)[0])) / (2 * eps)
    assert abs(analytic) > 1e-3, "the chosen direction must move the loss for the check to mean anything"
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=2e-4)
