"""The Pallas LoRA-on-MoE kernels (interpret mode) against the gmm reference: output and every gradient, on
ragged (expert, adapter) groups with empty and single-row groups, mixed adapters and ranks, fp32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.kernels import lora_moe as L
from models.layers.quantized import Fp8Weight, Int4Weight

E, X, D, F, R = 4, 3, 32, 48, 8
# pair group g = e*X + slot; slot 0 is the base model (scale 0). Empty groups, 1-row groups, and groups cut
# mid-tile by every tile size used below.
PAIR_SIZES = np.array([0, 5, 1, 0, 17, 1, 9, 0, 3, 2, 0, 8], np.int32)
SLOT_RANKS = {1: R, 2: 3}  # slot 2 uses rank 3 < max rank: its columns of A / rows of B past 3 are zero
EXTRA_ROWS = 3  # rows past the last group must come out zero
TEST_TILES = {"mosaic_tpu": L.Tiles(8, 16, 16, 8), "triton": L.Tiles(16, 16, 16, 16)}


def _problem(dtype):
    x, w, a, b, s, es, ps = L.random_problem(jax.random.key(1), PAIR_SIZES, E, D, F, R, dtype, EXTRA_ROWS)
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
    got = L.value_and_grads(args, kernel, interpret=True, tiles=TEST_TILES[kernel])
    ref_args = L.fp32_operands(args)
    ref = L.value_and_grads(ref_args, "reference", gmm_impl="loop")
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
    clean = L.value_and_grads(args, kernel, interpret=True, tiles=TEST_TILES[kernel])
    got = L.value_and_grads(poisoned, kernel, interpret=True, tiles=TEST_TILES[kernel])
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
    args = L.random_problem(jax.random.key(3), PAIR_SIZES, E, Dq, F, R, dtype, EXTRA_ROWS, **kind)
    w = args[1]
    assert isinstance(w, Int4Weight if quant == "int4" else Fp8Weight) and w.shape == (E, Dq, F)
    assert L.unsupported_reason(args[0], w, args[2], args[3], kernel, TEST_TILES[kernel]) is None
    got = L.value_and_grads(args, kernel, interpret=True, tiles=TEST_TILES[kernel])
    ref = L.value_and_grads(L.fp32_operands(args), "reference", gmm_impl="loop")
    for name, g, r in zip(("y", "dx", "dA", "dB", "dscale"), got, ref):
        g, r = _f64(g), _f64(r)
        assert np.abs(r).max() > 0, name
        np.testing.assert_allclose(g, r, atol=tol * np.abs(r).max(), rtol=0, err_msg=name)
    # the reference path reads the same weights in place too (gmm loop, one expert dequantized at a time)
    ref_quantized = L.value_and_grads(args, "reference", gmm_impl="loop")
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
        offsets, gids, tids, count = (np.asarray(t) for t in L.group_metadata(sizes, m, tm, visit_empty))
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


def test_impl_choice_env_override_and_fallback(monkeypatch):
    args, _ = _problem(jnp.float32)
    operands = args[:4]
    monkeypatch.delenv(L.ENV, raising=False)
    monkeypatch.setattr(L, "platform", lambda: "cpu")  # what follows is the CPU choice, wherever this runs
    assert L.resolve_impl("auto", operands) == "reference"  # CPU: interpret mode is not for real use
    assert L.resolve_impl("pallas", operands) == "mosaic_tpu"  # CPU: the TPU kernel, interpreted
    assert L.resolve_impl("triton", operands) == "triton"
    monkeypatch.setenv(L.ENV, "pallas")
    assert L.resolve_impl("auto", operands) == "mosaic_tpu"
    assert L.resolve_impl("reference", operands) == "reference"  # an explicit choice beats the variable
    monkeypatch.setenv(L.ENV, "reference")
    assert L.resolve_impl("auto", operands) == "reference"
    monkeypatch.setenv(L.ENV, "fast")
    with pytest.raises(ValueError, match=L.ENV):
        L.resolve_impl("auto", operands)
    monkeypatch.delenv(L.ENV)
    with pytest.raises(ValueError, match="unknown LoRA-on-MoE implementation"):
        L.resolve_impl("cuda")
    odd = (args[0][:, :30], args[1][:, :30], args[2][:, :30], args[3])  # D=30 does not tile for Triton
    assert L.resolve_impl("triton", odd) == "reference"

    # On an accelerator "auto" trusts the kernel only if its probe passes; a failing kernel falls back.
    monkeypatch.setattr(L, "platform", lambda: "gpu")
    monkeypatch.setattr(L, "_single_device", lambda: True)
    monkeypatch.setattr(L, "probe", lambda kernel, dtype: False)
    assert L.resolve_impl("auto", operands) == "reference"
    monkeypatch.setattr(L, "probe", lambda kernel, dtype: True)
    assert L.resolve_impl("auto", operands) == "triton"
    monkeypatch.setattr(L, "_single_device", lambda: False)  # a pallas_call needs shard_map on a mesh
    assert L.resolve_impl("auto", operands) == "reference"


def test_probe_reports_a_broken_kernel_and_runs_inside_a_trace(monkeypatch):
    from models.kernels import _lora_moe_triton

    def broken(*args, **kwargs):
        raise NotImplementedError("no lowering")

    monkeypatch.setattr(_lora_moe_triton, "gmm", broken)
    L.probe.cache_clear()
    assert L.probe("triton", "float32", True) is False
    # Called while a step is being traced, the probe still computes concretely (it runs in its own thread).
    monkeypatch.setattr(L, "_probe_error", lambda kernel, dtype, interpret: float(jnp.ones(2).sum()) - 2.0)
    L.probe.cache_clear()
    seen = []
    jax.jit(lambda v: seen.append(L.probe("triton", "float32", True)) or v)(jnp.ones(2))
    assert seen == [True]
    L.probe.cache_clear()


def test_moe_layer_uses_the_kernel_and_matches_the_reference(monkeypatch):
    """RoutedExperts(impl="triton") runs the kernel (interpreted on CPU; the faster of the two interpreters) in
    all three projections, and its output and LoRA gradients equal the default (gmm) path's."""
    from models.layers.moe import RoutedExperts
    from models.lora import LoraConfig, LoRAParam, init_adapter_slot

    calls = []
    real = L._kernel_lora_gmm_unpadded
    monkeypatch.setattr(L, "_kernel_lora_gmm_unpadded", lambda plan, *a: calls.append(plan.backend) or real(plan, *a))
    N, k, Dm, Fm = 10, 2, 16, 32
    layers = {}
    for impl in ("loop", "triton"):
        m = RoutedExperts(E, Dm, Fm, dtype=jnp.float32, rngs=nnx.Rngs(0), lora=LoraConfig(num_slots=3, max_rank=4),
                          impl=impl)
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
    kernel = L.platform_kernel()
    if size == "small":
        args, _ = _problem(dtype)
        tiles = L.Tiles(16, 16, 16, 16) if kernel == "triton" else L.Tiles(16, 128, 128, 16)
    else:
        sizes = np.random.default_rng(0).multinomial(3000, np.full(24, 1 / 24)).astype(np.int32)
        sizes[[0, 5, 7]] = [0, 1, 0]  # empty and single-row groups
        args = L.random_problem(jax.random.key(0), sizes, 8, 256, 384, 16, dtype, extra_rows=5,
                                int4_group=32 if size.endswith("int4") else None)
        tiles = None
    assert L.max_relative_error(args, kernel, interpret=False, tiles=tiles) <= tol
