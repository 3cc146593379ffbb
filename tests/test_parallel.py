"""Sharded runs on 8 virtual CPU devices equal the single-device run; expert parallelism divides expert FLOPs;
the trainer trains sharded; sharded LoRA state round-trips through Orbax; multi-host start-up reads its
environment."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_deepseek_config, tiny_hf_config
from flax import nnx

from models.config import config_from_hf_dict
from models.layers.moe import RoutedExperts
from models.layers.moe_impl import MoeImpl
from models.layers.quantized import ExpertQuant
from models.lora import LoraConfig, LoRAParam, init_adapter_slot, lora_modules
from models.registry import create_model
from parallel import make_mesh, mesh_shape, parse_mesh, variable_shardings
from parallel.expert import ExpertParallel

MESHES = ["data=8", "fsdp=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2", "sequence=2,tensor=4"]
CONFIGS = {"qwen3_moe": lambda: tiny_hf_config(num_hidden_layers=2),
           "kimi_k2": lambda: tiny_deepseek_config(num_hidden_layers=2, model_type="kimi_k2")}
SLOTS = jnp.array([0, 1, 2, 1, 2, 0, 1, 2])  # base-model rows and two live adapters in one batch
# LLVM's optimisation level changes neither the partitioning nor the numerics here, and halves compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def live_model(family: str):
    """A tiny model whose two adapters are non-zero everywhere (B random), so every LoRA path contributes."""
    cfg = config_from_hf_dict(CONFIGS[family]())
    model = create_model(cfg, lora=LoraConfig(num_slots=3, max_rank=4), dtype="float32", remat=False)
    for slot in (1, 2):
        init_adapter_slot(model, slot, rank=4, alpha=8.0, seed=slot)
    for i, (_, mod) in enumerate(lora_modules(model)):
        mod.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), mod.lora_b.shape)
    return cfg, model


def on_mesh(mesh):
    """Trace under `mesh` (JAX's mesh context, which the model reads); None: no mesh, the single-device program."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def logits_and_lora_grads(graphdef, lora, base, ids, mesh=None):
    """One program: logits and the gradient of a log-likelihood with respect to every LoRA factor."""
    def run(lora, base):
        def loss(lora):
            logits = nnx.merge(graphdef, lora, base)(ids, adapter_ids_B=SLOTS)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        return logits, grads
    with on_mesh(mesh):
        compiled = jax.jit(run).lower(lora, base).compile(FAST_COMPILE)
    return compiled(lora, base)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def single_device(request):
    cfg, model = live_model(request.param)
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size)
    logits, grads = logits_and_lora_grads(graphdef, lora, base, ids)
    return graphdef, lora, base, ids, logits, grads


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_logits_and_lora_grads_equal_single_device(single_device, mesh_spec):
    graphdef, lora, base, ids, ref_logits, ref_grads = single_device
    mesh = make_mesh(mesh_spec)
    lora_s, base_s = variable_shardings(lora, mesh), variable_shardings(base, mesh)
    lora_d, base_d = jax.device_put(lora, lora_s), jax.device_put(base, base_s)
    # the layout really shards: an expert weight lives in pieces when expert/tensor/fsdp axes exist
    segments = base_d["segments"]
    expert_weight = segments[max(segments.keys())]["mlp"]["experts"]["gate_proj"].get_value()
    if mesh.shape["expert"] * mesh.shape["tensor"] * mesh.shape["fsdp"] > 1:
        assert expert_weight.addressable_shards[0].data.size < expert_weight.size
    logits, grads = logits_and_lora_grads(graphdef, lora_d, base_d, ids, mesh)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    flat, ref_flat = nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)
    assert len(flat) == len(ref_flat) > 0
    for (path, g), (_, r) in zip(flat, ref_flat):
        r = np.asarray(r.get_value())
        assert np.abs(r).max() > 0, path  # every factor gets a gradient, so the comparison means something
        np.testing.assert_allclose(np.asarray(g.get_value()), r, atol=1e-5, rtol=0, err_msg=str(path))


def test_sharded_layers_never_gather_every_experts_weights():
    """Under expert parallelism each layer of the scanned stack takes its own experts' shards: no collective
    assembles the experts of all layers (or of one whole layer) on a device. Kimi K2's planned step once did,
    a 4.7 TB temporary per device, when a layer's experts were sliced from the flattened [L*E, ...] view."""
    cfg = config_from_hf_dict(tiny_deepseek_config(num_hidden_layers=3, model_type="kimi_k2"))  # 2 MoE layers
    model = create_model(cfg, lora=LoraConfig(num_slots=3, max_rank=4), dtype="float32", remat=False)
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)
    mesh = make_mesh("expert=4,tensor=2")
    lora = jax.device_put(lora, variable_shardings(lora, mesh))
    base = jax.device_put(base, variable_shardings(base, mesh))

    def forward(lora, base):
        return nnx.merge(graphdef, lora, base)(jnp.zeros((8, 16), jnp.int32), adapter_ids_B=SLOTS)

    with jax.set_mesh(mesh):
        hlo = jax.jit(forward).lower(lora, base).compile(FAST_COMPILE).as_text()
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    L = cfg.num_hidden_layers - cfg.first_k_dense_replace
    whole = {f"[{lead}{a},{b}]" for lead in (f"{E},", f"{L * E},", f"{L},{E},") for a, b in ((D, F), (F, D))}
    gathered = [line.split(" all-gather(")[0] for line in hlo.splitlines() if " all-gather(" in line]
    assert gathered, "the layout shards the model, so some weights are gathered"
    every_expert = [g for g in gathered if any(shape in g for shape in whole)]
    assert not every_expert, every_expert


# --------------------------------------------------------------------------------------------- expert parallel

E, D, F, N, K = 16, 32, 16, 512, 2


def experts_layer(impl: MoeImpl = MoeImpl.BLOCKED, expert_parallel: ExpertParallel = ExpertParallel()):
    layer = RoutedExperts(E, D, F, dtype=jnp.float32, rngs=nnx.Rngs(0), lora=LoraConfig(num_slots=2, max_rank=4),
                          std=0.2, impl=impl, expert_parallel=expert_parallel)
    for i, mod in enumerate((layer.gate_lora, layer.up_lora, layer.down_lora)):
        mod.lora_a[...] = 0.2 * jax.random.normal(jax.random.key(10 + i), mod.lora_a.shape)
        mod.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(20 + i), mod.lora_b.shape)
        mod.lora_scale[...] = jnp.array([0.0, 2.0])
    return layer


@pytest.mark.parametrize("quant", [ExpertQuant("int4", group=8), ExpertQuant("fp8", block=(8, 8))],
                         ids=["int4", "fp8"])
def test_quantized_experts_run_expert_parallel_like_one_device(quant):
    """Quantized experts (values and scales sharded as the weights they stand for) under expert and tensor
    parallelism give the single-device output. Tensor parallelism over the down projection's packed side stops
    where a shard would cut a 4-bit block of nibble planes (F=16 is one block, so it is not split); FP8 shards
    hold whole 8x8 scale blocks."""
    layer = RoutedExperts(E, D, F, dtype=jnp.float32, rngs=nnx.Rngs(0), lora=LoraConfig(num_slots=2, max_rank=4),
                          std=0.2, impl=MoeImpl.LOOP, quant=quant)
    values, scale = layer.gate_proj.get_value(), layer.gate_proj_scale.get_value()
    if quant.kind == "int4":
        assert values.dtype == jnp.int32 and values.shape == (E, D // 8, F) and scale.shape == (E, D // 8, F)
    else:
        assert values.dtype == jnp.float8_e4m3fn and values.shape == (E, D, F) and scale.shape == (E, D // 8, F // 8)
    for i, mod in enumerate((layer.gate_lora, layer.up_lora, layer.down_lora)):
        mod.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(20 + i), mod.lora_b.shape)
        mod.lora_scale[...] = jnp.array([0.0, 2.0])
    inputs = routed_inputs(jax.random.randint(jax.random.key(3), (N, K), 0, E))
    ref, _ = run_layer(layer, inputs)
    assert np.abs(np.asarray(ref)).max() > 0
    for spec in ("expert=8", "expert=4,tensor=2"):
        out, _ = run_layer(layer, inputs, make_mesh(spec))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0, err_msg=spec)


def routed_inputs(experts_Nk):
    x = jax.random.normal(jax.random.key(1), (N, D))
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(2), (N, K)), axis=-1)
    slots = jnp.arange(N) % 2
    return x, weights, jnp.asarray(experts_Nk, jnp.int32), slots


def run_layer(layer, inputs, mesh=None):
    graphdef, state = nnx.split(layer)

    def f(state, x, w, e, s):
        return nnx.merge(graphdef, state)(x, w, e, s)

    if mesh is not None:
        state = jax.device_put(state, variable_shardings(state, mesh))
    with on_mesh(mesh):
        compiled = jax.jit(f).lower(state, *inputs).compile(FAST_COMPILE)
    return compiled(state, *inputs), compiled


def test_expert_flops_per_shard_fall_as_one_over_ep():
    """Each shard multiplies only the rows routed to its own experts: with balanced routing the compiled
    per-device FLOPs (expert matmuls, LoRA included) are 1/EP of the single-device program's."""
    balanced = (np.arange(N)[:, None] * K + np.arange(K)) % E  # every shard sends every shard the same load
    layer, inputs = experts_layer(expert_parallel=ExpertParallel(capacity_factor=1.0)), routed_inputs(balanced)
    reference, _ = run_layer(layer, inputs)
    flops = {}
    for ep in (1, 2, 4, 8):  # a mesh of one device is the single-device program
        out, compiled = run_layer(layer, inputs, make_mesh(f"expert={ep}", jax.devices()[:ep]))
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-5, rtol=0)
        flops[ep] = compiled.cost_analysis()["flops"]
    for ep in (2, 4, 8):
        assert flops[ep] * ep == pytest.approx(flops[1], rel=0.1), flops
    print("per-device MoE FLOPs by EP:", flops)


@pytest.mark.parametrize("dispatch", ["all_to_all", "gather"])
def test_skewed_routing_is_dropless(dispatch):
    """Every token picks experts 0 and 1 (both on shard 0): the all-to-all takes several capacity rounds,
    the gather path one, and nothing is dropped."""
    skewed = np.tile([0, 1], (N, 1))
    layer = experts_layer(MoeImpl.LOOP, ExpertParallel(strategy=dispatch, capacity_factor=1.0))
    inputs = routed_inputs(skewed)
    reference, _ = run_layer(layer, inputs)
    out, _ = run_layer(layer, inputs, make_mesh("expert=4,tensor=2"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- meshes


def test_mesh_specs():
    assert parse_mesh("data=2,expert=2,tensor=2") == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2, "sequence": 1}
    assert mesh_shape("expert=4,fsdp=-1", 64) == {"data": 1, "fsdp": 16, "expert": 4, "tensor": 1, "sequence": 1}
    assert mesh_shape(None, 8)["data"] == 8
    with pytest.raises(ValueError, match="unknown"):
        parse_mesh("pipeline=2")
    with pytest.raises(ValueError, match="has 4 devices"):
        mesh_shape("expert=4", 8)
    mesh = make_mesh("expert=4,tensor=2")
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor", "sequence") and math.prod(mesh.shape.values()) == 8


# ----------------------------------------------------------------------------------- trainer and checkpoints


def test_sharded_orbax_round_trip_across_meshes(tmp_path):
    """A trainer's adapter state saved from one mesh restores into another mesh's shardings, value for value."""
    from jtinker.checkpoints import restore_sharded, save_sharded, trainer_arrays
    from jtinker.trainer import Trainer

    _, model = live_model("qwen3_moe")
    source = Trainer(model, mesh=make_mesh("expert=4,tensor=2"))
    source.opt_state["m"] = {p: a + 0.5 for p, a in source.opt_state["m"].items()}
    source.opt_state["step"] = source.opt_state["step"].at[1].set(7)
    save_sharded(source, tmp_path / "state")
    _, fresh = live_model("qwen3_moe")
    for _, mod in lora_modules(fresh):  # different values everywhere, so the restore has to overwrite them
        mod.lora_b[...] = mod.lora_b[...] * 0
    target = Trainer(fresh, mesh=make_mesh("data=2,fsdp=2,tensor=2"))
    restore_sharded(target, tmp_path / "state")
    saved, restored = trainer_arrays(source), trainer_arrays(target)
    for group in ("lora", "scale", "m", "v"):
        for key, a in saved[group].items():
            b = restored[group][key]
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=key)
            assert b.sharding.mesh.shape == target.layout.mesh.shape
    assert int(restored["step"][1]) == 7
    weight = restored["lora"]["segments/0/mlp/experts/gate_lora/lora_b"]
    assert weight.addressable_shards[0].data.size < weight.size  # restored sharded, not gathered


def test_trainer_on_a_mesh_trains_like_one_device():
    """forward_backward + optim_step with data=2, expert=2, tensor=2: same loss, log-probs and updated adapter."""
    from jtinker.optim import AdamParams
    from jtinker.trainer import Datum, Trainer

    rng = np.random.default_rng(0)
    data = [Datum(tokens=rng.integers(0, 96, 12), loss_fn_inputs={"target_tokens": rng.integers(0, 96, 12),
                                                                   "weights": np.ones(12, np.float32)})
            for _ in range(3)]
    results = []
    for mesh in (None, make_mesh("data=2,expert=2,tensor=2")):
        trainer = Trainer(live_model("qwen3_moe")[1], mesh=mesh)
        first = trainer.forward_backward(data, [1, 2, 1], "cross_entropy")
        trainer.optim_step(1, AdamParams(learning_rate=1e-2))
        results.append((first, trainer))
    (single, t1), (sharded, t8) = results
    assert sharded.loss == pytest.approx(single.loss, rel=1e-6)
    for a, b in zip(single.logprobs, sharded.logprobs):
        np.testing.assert_allclose(b, a, atol=1e-5)
    for path, a in t1.lora.items():
        np.testing.assert_allclose(np.asarray(t8.lora[path]), np.asarray(a), atol=1e-6, err_msg=str(path))
    assert any(len(a.sharding.device_set) == 8 for a in t8.lora.values())


# ---------------------------------------------------------------------------------------------- multi-host


def test_distributed_config_from_environment():
    from parallel.distributed import DistributedConfig, config_from_env, global_batch, host_rows

    assert config_from_env({}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert config_from_env(env) == DistributedConfig("10.0.0.1:1234", 4, 2, (0, 1))
    assert config_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == DistributedConfig(None, None, None)
    assert config_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    for bad, message in (({"JAX_COORDINATOR_ADDRESS": "host"}, "host:port"),
                         ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
                         ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
                          "must be in"),
                         ({"JAX_PROCESS_ID": "0"}, "without JAX_COORDINATOR_ADDRESS"),
                         ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "x", "JAX_PROCESS_ID": "0"},
                          "integer")):
        with pytest.raises(ValueError, match=message):
            config_from_env(bad)
    assert host_rows(32, process_id=3, process_count=4) == slice(24, 32)
    with pytest.raises(ValueError, match="evenly"):
        host_rows(30, process_id=0, process_count=4)
    mesh = make_mesh("data=8")
    rows = np.arange(16 * 3).reshape(16, 3)
    from jax.sharding import NamedSharding, PartitionSpec

    array = global_batch(rows[host_rows(16)], NamedSharding(mesh, PartitionSpec("data")), 16)
    assert array.shape == (16, 3) and len(array.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(array), rows)


def test_compare_torch_runs_the_jax_side_sharded(hf_checkpoint):
    from jtinker.compare_torch import compare

    result = compare(hf_checkpoint("parallel-tiny", num_hidden_layers=2), mesh="data=2,expert=2,tensor=2")
    assert result["mesh"] == "data=2,expert=2,tensor=2"
    assert result["passed"] and result["max_abs_logit_diff"] < 1e-4 and result["router_agreement"] == 1.0


def test_plan_reads_per_device_memory_from_the_compiled_steps():
    from jtinker.plan import run_plan
    from parallel.planner import parse_bytes

    assert parse_bytes("141GB") == 141 * 10**9 and parse_bytes("96GiB") == 96 * 2**30
    result = run_plan("tiny-qwen3-moe", devices=8, device_memory=parse_bytes("1GB"), seq_len=32, lora_rank=4,
                      search=False)
    assert result["mesh"] == "expert=8" and result["fits"]
    parts = result["parts"]
    assert result["per_device_bytes"] == sum(parts.values()) and parts["activations_and_temporaries"] > 0
    assert parts["optimizer"] == 2 * parts["lora"]  # fp32 factors: AdamW m and v are their size each
    assert result["decode"]["parts"]["kv_cache"] > 0 and result["decode"]["per_device_bytes"] < 10**9
    with pytest.raises(ValueError, match="expected auto, bf16, fp8 or int4"):
        run_plan("tiny-qwen3-moe", devices=8, device_memory=10**9, quant="int8")


def test_plan_with_4_bit_experts_holds_their_packed_bytes():
    """`--quant int4` plans the step with the routed experts 4-bit: each device holds its experts' words and
    scales (0.5 + 2/32 bytes a weight at bf16 scales) instead of 2 bytes a weight."""
    from jtinker.plan import run_plan
    from models.registry import create_abstract_model, preset_config

    plans = {q: run_plan("tiny-kimi-k2", devices=8, device_memory=10**9, seq_len=16, lora_rank=4, quant=q,
                         decode=False, search=False) for q in ("bf16", "int4")}
    assert plans["int4"]["quant"].startswith("routed experts int4") and plans["bf16"]["quant"] == "bf16"
    cfg = preset_config("tiny-kimi-k2")
    experts = create_abstract_model(cfg).segments[1].mlp.experts
    expert_weights = sum(int(np.prod(getattr(experts, p).get_value().shape)) for p in ("gate_proj", "up_proj",
                                                                                       "down_proj"))
    saved = plans["bf16"]["parts"]["weights"] - plans["int4"]["parts"]["weights"]
    assert saved == expert_weights * (2 - 0.5 - 2 / 32) // 8  # 8 devices, experts split over expert=8
