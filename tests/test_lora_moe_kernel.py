"""The Pallas LoRA-on-MoE kernels (interpret mode) against the gmm reference: output and every gradient, on
ragged (expert, adapter) groups with empty and single-row groups, mixed adapters and ranks, fp32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtinker.bench_moe_lora import fp32_operands, random_problem
from models.kernels import lora_moe as L
from models.kernels.lora_moe.common import group_metadata
from models.layers.moe_impl import MoeImpl, platform_kernel, resolve_moe_impl
from models.layers.quantized import ExpertQuant, Fp8Weight, Int4Weight
from models.lora import LoraConfig

E, X, D, F, R = 4, 3, 32, 48, 8
# pair group g = e*X + slot; slot 0 is the base model (scale 0). Empty groups, 1-row groups, and groups cut
# mid-tile by every tile size used below.
PAIR_SIZES = np.array([0, 5, 1, 0, 17, 1, 9, 0, 3, 2, 0, 8], np.int32)
SLOT_RANKS = {1: R, 2: 3}  # slot 2 uses rank 3 < max rank: its columns of A / rows of B past 3 are zero
EXTRA_ROWS = 3  # rows past the last group must come out zero
TEST_TILES = {"mosaic_tpu": L.Tiles(8, 16, 16, 8), "triton": L.Tiles(16, 16, 16, 16)}


def value_and_grads(args, impl: str, **kwargs):
    """y and (dx, dA, dB, dscale) of sum(y * fixed cotangent), jitted: what the tests compare."""
    x, w, a, b, s, es, ps = args
    ct = jax.random.normal(jax.random.key(7), (x.shape[0], w.shape[2]), jnp.float32).astype(x.dtype)

    def loss(x, a, b, s):
        y = L.lora_gmm(x, w, a, b, s, es, ps, impl=impl, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, s)
    return (y,) + tuple(grads)


def max_relative_error(args, kernel: str, **kwargs) -> float:
    """max over (y, dx, dA, dB, dscale) of max|kernel - reference| / max|reference| (reference in fp32)."""
    got = value_and_grads(args, kernel, **kwargs)
    ref = value_and_grads(fp32_operands(args), "reference")
    errs = []
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        errs.append(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))
    return float(max(errs))


def _problem(dtype):
    x, w, a, b, s, es, ps = random_problem(jax.random.key(1), PAIR_SIZES, E, D, F, R, dtype, EXTRA_ROWS)
    rank_G = np.array([SLOT_RANKS.get(g % X, R) for g in range(E * X)])
    a = jnp.where(jnp.arange(R)[None, None, :] < rank_G[:, None, None], a, 0).astype(dtype)
    b = jnp.where(jnp.arange(R)[None, :, None] < rank_G[:, None, None], b, 0).astype(dtype)
    return (x, w, a, b, s, es, ps), rank_G


def _f64(t):
    return np.asarray(jnp.asarray(t, jnp.float32), np.float64)


@pytest.mark.parametrize("kernel", ["mosaic_tpu", "triton"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_kernel_output_and_gradients_match_reference(kernel, dtype, tol):
    args, rank_G = _problem(dtype)
    got = value_and_grads(args, kernel, interpret=True, tiles=TEST_TILES[kernel])
    ref_args = fp32_operands(args)
    ref = value_and_grads(ref_args, "reference", gmm_impl="loop")
    names = ("y", "dx", "dA", "dB", "dscale")
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape and g.dtype == (jnp.float32 if name == "dscale" else dtype), name
        g, r = _f64(g), _f64(r)
        assert np.abs(r).max() > 0, name
        np.testing.assert_allclose(g, r, atol=tol * np.abs(r).max(), rtol=0, err_msg=name)

    y, dx, da, db, _ = (_f64(t) for t in got)
    rows = int(PAIR_SIZES.sum())
    assert np.all(y[rows:] == 0) and np.all(dx[rows:] == 0)  # rows past the groups
    empty = PAIR_SIZES == 0
    assert np.all(da[empty] == 0) and np.all(db[empty] == 0)  # empty groups get no gradient
    assert not np.all(da[~empty & (np.arange(E * X) % X != 0)] == 0)
    for g, rank in enumerate(rank_G):  # a slot's rank holds: its padding columns/rows get zero gradient
        assert np.all(da[g, :, rank:] == 0) and np.all(db[g, rank:, :] == 0)


@pytest.mark.parametrize("kernel", ["mosaic_tpu", "triton"])
def test_a_non_finite_factor_of_one_slot_leaves_every_other_rows_results_exact(kernel):
    """Issue 18: the epilogue zeroed other slots' rows before multiplying by a pair's B, and 0 * NaN is NaN, so
    one tenant's broken adapter reached the rows of every tenant sharing its expert's tile."""
    args, _ = _problem(jnp.float32)
    x, w, a, b, s, es, ps = args
    bad = 4  # expert 1, slot 1: 17 rows, sharing tiles with expert 1's slot 2 and expert 2's rows
    start = int(PAIR_SIZES[:bad].sum())
    rows = np.arange(x.shape[0])
    others = (rows < start) | (rows >= start + PAIR_SIZES[bad])
    poisoned = (x, w, a, b.at[bad].set(jnp.nan), s, es, ps)
    clean = value_and_grads(args, kernel, interpret=True, tiles=TEST_TILES[kernel])
    got = value_and_grads(poisoned, kernel, interpret=True, tiles=TEST_TILES[kernel])
    assert not np.isfinite(np.asarray(got[0])[~others]).all()  # the broken slot's own rows are NaN
    for name, g, c in zip(("y", "dx"), got[:2], clean[:2]):
        np.testing.assert_array_equal(np.asarray(g)[others], np.asarray(c)[others], err_msg=name)
    for name, g, c in zip(("dA", "dB"), got[2:4], clean[2:4]):
        keep = np.arange(E * X) != bad
        np.testing.assert_array_equal(np.asarray(g)[keep], np.asarray(c)[keep], err_msg=name)


# 4-bit: D=128 gives 16-row nibble planes, so each block of 8 planes spans 4 scale groups of 32 rows.
# FP8: 16x16 scale blocks, so the test tiles (8 or 16 wide) each lie in one block.
QUANTIZED_WEIGHTS = {"int4": (128, dict(int4_group=32)), "fp8": (D, dict(fp8_block=(16, 16)))}


@pytest.mark.parametrize("kernel", ["mosaic_tpu", "triton"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("quant", sorted(QUANTIZED_WEIGHTS))
def test_quantized_expert_weights_are_dequantized_inside_the_kernel(kernel, dtype, tol, quant):
    """Frozen 4-bit or FP8 experts: the kernel's output and gradients equal the reference run on the
    dequantized weights, and no gradient reaches the quantized weights."""
    Dq, kind = QUANTIZED_WEIGHTS[quant]
    args = random_problem(jax.random.key(3), PAIR_SIZES, E, Dq, F, R, dtype, EXTRA_ROWS, **kind)
    w = args[1]
    assert isinstance(w, Int4Weight if quant == "int4" else Fp8Weight) and w.shape == (E, Dq, F)
    assert L.unsupported_reason(args[0], w, args[2], args[3], kernel, TEST_TILES[kernel]) is None
    got = value_and_grads(args, kernel, interpret=True, tiles=TEST_TILES[kernel])
    ref = value_and_grads(fp32_operands(args), "reference", gmm_impl="loop")
    for name, g, r in zip(("y", "dx", "dA", "dB", "dscale"), got, ref):
        g, r = _f64(g), _f64(r)
        assert np.abs(r).max() > 0, name
        np.testing.assert_allclose(g, r, atol=tol * np.abs(r).max(), rtol=0, err_msg=name)
    # the reference path reads the same weights in place too (gmm loop, one expert dequantized at a time)
    ref_quantized = value_and_grads(args, "reference", gmm_impl="loop")
    np.testing.assert_allclose(_f64(ref_quantized[0]), _f64(got[0]), atol=tol * np.abs(_f64(got[0])).max(), rtol=0)
    # scales that cut a tile apart cannot be read a tile at a time: the kernel declines
    if quant == "int4":
        odd, why = Int4Weight(w.packed, jnp.repeat(w.scale, 4, axis=1)), "do not align"  # groups of 8 rows
    else:
        odd, why = Fp8Weight(w.values, w.scale, (24, 16)), "do not hold whole"  # 16-row tiles straddle blocks
    assert why in L.unsupported_reason(args[0], odd, args[2], args[3], kernel, TEST_TILES[kernel])


def test_group_metadata_visits_every_row_of_every_group_once():
    tm, m = 8, 48
    sizes = jnp.asarray(np.array([0, 5, 1, 0, 17, 1, 9, 0, 15], np.int32))
    for visit_empty in (False, True):
        offsets, gids, tids, count = (np.asarray(t) for t in group_metadata(sizes, m, tm, visit_empty))
        n = int(count[0])
        assert n <= gids.shape[0] == m // tm + len(sizes) - 1
        assert np.all(np.diff(tids[:n]) >= 0) and np.all(np.diff(gids[:n]) >= 0)  # revisits are consecutive
        covered = np.zeros(m, int)
        for g, t in zip(gids[:n], tids[:n]):
            rows = np.arange(t * tm, (t + 1) * tm)
            covered[rows[(rows >= offsets[g]) & (rows < offsets[g + 1])]] += 1
        assert np.all(covered[:offsets[-1]] == 1) and np.all(covered[offsets[-1]:] == 0)
        visited = set(gids[:n].tolist())
        assert visited == {g for g in range(len(sizes)) if sizes[g] > 0 or visit_empty}


def test_the_implementation_is_decided_from_platform_and_shapes_alone(monkeypatch):
    """`resolve_moe_impl` runs once, when the model is built: the platform, the device count and the shapes
    decide; no environment variable and no probe does."""
    lora = LoraConfig(num_slots=X, max_rank=R)
    shapes = dict(num_experts=E, hidden_size=D, expert_size=F, dtype=jnp.float32, quant=None)
    cpu = dict(backend="cpu", device_count=1)
    gpu = dict(backend="gpu", device_count=1)
    monkeypatch.setenv("JTINKER_MOE_KERNEL", "pallas")  # the old override is ignored
    assert resolve_moe_impl("auto", **shapes, lora=lora, **cpu) is MoeImpl.LOOP  # interpret mode is for tests
    assert resolve_moe_impl("pallas", **shapes, lora=lora, **cpu) is MoeImpl.MOSAIC_TPU  # interpreted on CPU
    assert resolve_moe_impl("triton", **shapes, lora=lora, **cpu) is MoeImpl.TRITON
    assert resolve_moe_impl("reference", **shapes, lora=lora, **cpu) is MoeImpl.LOOP
    assert resolve_moe_impl("auto", **shapes, lora=lora, **gpu) is MoeImpl.TRITON
    assert resolve_moe_impl("reference", **shapes, lora=lora, **gpu) is MoeImpl.RAGGED
    assert resolve_moe_impl("auto", **shapes, lora=None, **gpu) is MoeImpl.RAGGED  # no expert LoRA, no kernel
    # a pallas_call cannot be partitioned by XLA across devices
    assert resolve_moe_impl("auto", **shapes, lora=lora, backend="gpu", device_count=8) is MoeImpl.RAGGED
    odd = {**shapes, "hidden_size": 30}  # D=30 does not tile for Triton
    assert resolve_moe_impl("auto", **odd, lora=lora, **gpu) is MoeImpl.RAGGED
    with pytest.raises(ValueError, match="'triton' cannot run this model's experts: dimension 30"):
        resolve_moe_impl("triton", **odd, lora=lora, **gpu)
    quant = {**shapes, "hidden_size": 128, "quant": ExpertQuant("int4", group=8)}  # groups cut nibble planes
    assert resolve_moe_impl("auto", **quant, lora=lora, **gpu) is MoeImpl.LOOP  # quantized: the loop gmm
    with pytest.raises(ValueError, match="unknown MoE implementation 'cuda'"):
        resolve_moe_impl("cuda", **shapes, lora=lora, **cpu)
    with pytest.raises(ValueError, match="cannot take x"):  # a kernel call on operands it cannot take
        args, _ = _problem(jnp.float32)
        L.lora_gmm(args[0][:, :30], args[1][:, :30], args[2][:, :30], args[3], *args[4:], impl="triton")


def test_a_model_records_its_implementation_in_its_config():
    from conftest import tiny_hf_config

    from models.config import config_from_hf_dict
    from models.layers.moe import RoutedExperts
    from models.registry import create_abstract_model

    cfg = config_from_hf_dict(tiny_hf_config())
    assert cfg.moe_impl == "auto"
    for requested, built in (("auto", "loop"), ("pallas", "mosaic_tpu"), ("dense", "dense")):
        model = create_abstract_model(cfg, lora=LoraConfig(num_slots=2, max_rank=4), moe_impl=requested)
        assert model.config.moe_impl == built
        experts = [m for _, m in nnx.iter_graph(model) if isinstance(m, RoutedExperts)]
        assert experts and all(m.impl is MoeImpl(built) for m in experts)
    with pytest.raises(TypeError, match="resolved MoeImpl"):
        RoutedExperts(E, D, F, dtype=jnp.float32, rngs=nnx.Rngs(0), lora=None, impl="auto")


def test_moe_layer_uses_the_kernel_and_matches_the_reference(monkeypatch):
    """RoutedExperts(impl="triton") runs the kernel (interpreted on CPU; the faster of the two interpreters) in
    all three projections, and its output and LoRA gradients equal the default (gmm) path's."""
    from models.layers.moe import RoutedExperts
    from models.lora import LoRAParam, init_adapter_slot

    calls = []
    real = L.kernel_lora_gmm
    monkeypatch.setattr(L, "kernel_lora_gmm", lambda plan, *a: calls.append(plan.backend) or real(plan, *a))
    N, k, Dm, Fm = 10, 2, 16, 32
    layers = {}
    for impl in ("loop", "triton"):
        m = RoutedExperts(E, Dm, Fm, dtype=jnp.float32, rngs=nnx.Rngs(0), lora=LoraConfig(num_slots=3, max_rank=4),
                          impl=MoeImpl(impl))
        for slot, rank in ((1, 4), (2, 2)):
            init_adapter_slot(m, slot, rank=rank, alpha=8.0, seed=slot)
        for lora in (m.gate_lora, m.up_lora, m.down_lora):  # B = 0 at init would hide the expand path
            lora.lora_b[...] = jax.random.normal(jax.random.key(3), lora.lora_b.shape) * 0.1
        layers[impl] = m
    kx, kw, ke = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (N, Dm))
    weights = jax.nn.softmax(jax.random.normal(kw, (N, k)))
    experts = jax.random.randint(ke, (N, k), 0, E)
    slots = jnp.array([0, 1, 2, 1, 1, 2, 0, 2, 1, 1])

    def run(m):
        graphdef, lora_state, rest = nnx.split(m, LoRAParam, ...)

        def loss(lora_state):
            y = nnx.merge(graphdef, lora_state, rest)(x, weights, experts, slots)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora_state)
        return y, grads

    y_ref, g_ref = run(layers["loop"])
    assert not calls
    y, g = run(layers["triton"])
    assert calls == ["triton"] * 3
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert np.abs(np.asarray(ref)).max() > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled (non-interpret) kernels need a GPU or TPU")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("size", ["small", "default_tiles", "default_tiles_int4"])
def test_compiled_kernel_on_accelerator(dtype, tol, size):
    """The platform's kernel compiled for real (Triton on GPU, Mosaic on TPU) against the fp32 reference, with
    float and with 4-bit expert weights."""
    kernel = platform_kernel(jax.default_backend()).value
    if size == "small":
        args, _ = _problem(dtype)
        tiles = L.Tiles(16, 16, 16, 16) if kernel == "triton" else L.Tiles(16, 128, 128, 16)
    else:
        sizes = np.random.default_rng(0).multinomial(3000, np.full(24, 1 / 24)).astype(np.int32)
        sizes[[0, 5, 7]] = [0, 1, 0]  # empty and single-row groups
        args = random_problem(jax.random.key(0), sizes, 8, 256, 384, 16, dtype, extra_rows=5,
                                int4_group=32 if size.endswith("int4") else None)
        tiles = None
    assert max_relative_error(args, kernel, interpret=False, tiles=tiles) <= tol
