"""GPU (Pallas Triton) kernels behind `lora_gmm`: a grouped matmul with a fused, slot-masked LoRA-expand
epilogue, and a grouped transposed matmul for the LoRA factor gradients.

Triton has no scalar prefetch, so the tile->group metadata arrives as ordinary inputs and every operand is a
whole-array ref indexed by hand. A row tile that holds rows of several groups is computed once per group and
stored under a row mask, so ragged, empty and single-row groups need no padding of the groups themselves.
Runs on CPU with `interpret=True` (the generic Pallas interpreter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.layers.quantized import NIBBLES, Fp8Weight, Int4Weight, nibble_plane

NUM_WARPS, NUM_STAGES = 4, 3


def _dot(a, b, contract_a: int, contract_b: int):
    # fp32 inputs: full-precision (IEEE) dots, not TF32, so the fp32 path is a real fp32 reference.
    precision = (jax.lax.Precision.HIGHEST,) * 2 if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def gmm(lhs, rhs, meta, *, transpose_rhs: bool, num_groups: int, out_dtype, tiles, epi_lhs=None, epi_rhs=None,
        epi_offsets=None, transpose_epi: bool = False, interpret: bool = False, num_warps: int = NUM_WARPS,
        num_stages: int = NUM_STAGES):
    """out[rows of group g] = lhs @ rhs[g] (+ the LoRA expand below), for g < num_groups; rows of the tail group
    (g == num_groups, rows past the real groups) are zero.

    lhs [M, K]; rhs [G, K, N] ([G, N, K] if transpose_rhs), or an `Int4Weight` of that shape, dequantized a
    nibble plane at a time (P rows of its packed side: the K tile is 8P forward, the N tile 8P transposed), or
    an `Fp8Weight` whose tiles each lie in one scale block;
    meta = (offsets [G+2], group_ids [I], tile_ids [I], num_items [1]) over G+1 groups. Epilogue, with
    X = epi_rhs.shape[0] // G slots per group: epi_lhs [M, R] and epi_rhs [G*X, R, N] ([G*X, N, R] if
    transpose_epi), and epi_offsets [G*X+1 or more] the row offsets of the (group, slot) pairs; each row of group g adds
    epi_lhs[row] @ epi_rhs[g*X + its slot]. A tile is computed once per group, and the slots inside it are
    masked apart in the epilogue only (X small dots of depth R), so the base matmul never repeats for adapter
    boundaries.
    """
    tm, tk, tn = tiles
    M, K = lhs.shape
    int4, fp8 = isinstance(rhs, Int4Weight), isinstance(rhs, Fp8Weight)
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    offsets, group_ids, tile_ids, num_items = meta
    epilogue = epi_lhs is not None
    num_slots = epi_rhs.shape[0] // num_groups if epilogue else 0
    assert M % tm == 0 and K % tk == 0 and N % tn == 0, (M, K, N, tiles)
    if int4:
        P, group = rhs.plane, rhs.group
        assert (tn if transpose_rhs else tk) == NIBBLES * P, (tiles, P)
        chunks = [(j * P, P) for j in range(NIBBLES)] if transpose_rhs else [(0, tn)]
        weights = [rhs.packed, rhs.scale]
    else:
        chunks, weights = [(0, tn)], [rhs.values, rhs.scale] if fp8 else [rhs]

    def kernel(offsets_ref, gids_ref, tids_ref, count_ref, lhs_ref, *rest):
        out_ref = rest[-1]
        rhs_ref, scale_ref = (rest[0], rest[1]) if len(weights) == 2 else (rest[0], None)
        rest = rest[len(weights):]
        n_i, item = pl.program_id(0), pl.program_id(1)

        @pl.when(item < count_ref[0])
        def _():
            g, t = gids_ref[item], tids_ref[item]
            rows_ds = pl.ds(t * tm, tm)
            rows = t * tm + jnp.arange(tm, dtype=jnp.int32)
            in_group = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
            live = g < num_groups

            def store(accs):
                for (start, width), acc in zip(chunks, accs):
                    plgpu.store(out_ref.at[rows_ds, pl.ds(n_i * tn + start, width)], acc.astype(out_ref.dtype),
                                mask=jnp.broadcast_to(in_group[:, None], (tm, width)))

            def body(k_i, accs):
                ks = pl.ds(k_i * tk, tk)
                if not int4:
                    cols = pl.ds(n_i * tn, tn)
                    x = lhs_ref[rows_ds, ks]
                    w = rhs_ref[g, cols, ks] if transpose_rhs else rhs_ref[g, ks, cols]
                    if fp8:  # the tile lies in one scale block
                        (bk, bn), (k_side, n_side) = rhs.block, ((n_i * tn, k_i * tk) if transpose_rhs
                                                                  else (k_i * tk, n_i * tn))
                        w = (w.astype(jnp.float32) * scale_ref[g, k_side // bk, n_side // bn]).astype(x.dtype)
                    return (accs[0] + _dot(x, w, 1, 1 if transpose_rhs else 0),)
                if transpose_rhs:  # output columns n_i*8P.. are the packed side: one accumulator per plane
                    words = rhs_ref[g, pl.ds(n_i * P, P), ks]
                    x = lhs_ref[rows_ds, ks]
                    new = []
                    for j, acc in enumerate(accs):
                        scales = scale_ref[g, pl.ds((n_i * tn + j * P) // group, 1), ks]
                        new.append(acc + _dot(x, nibble_plane(words, j, scales, x.dtype), 1, 1))
                    return tuple(new)
                cols = pl.ds(n_i * tn, tn)
                words, acc = rhs_ref[g, pl.ds(k_i * P, P), cols], accs[0]
                for j in range(NIBBLES):  # the K tile is 8 planes of P rows
                    row = k_i * tk + j * P
                    x = lhs_ref[rows_ds, pl.ds(row, P)]
                    scales = scale_ref[g, pl.ds(row // group, 1), cols]
                    acc = acc + _dot(x, nibble_plane(words, j, scales, x.dtype), 1, 0)
                return (acc,)

            @pl.when(live)
            def _compute():
                accs = jax.lax.fori_loop(0, K // tk, body,
                                         tuple(jnp.zeros((tm, width), jnp.float32) for _, width in chunks))
                if epilogue:
                    h_ref, b_ref, slot_offsets_ref = rest[0], rest[1], rest[2]
                    h = h_ref[rows_ds, :]
                    accs = list(accs)
                    for slot in range(num_slots):  # masked after the dot: 0 * a NaN factor of another slot is NaN
                        pair = g * num_slots + slot
                        in_slot = (rows >= slot_offsets_ref[pair]) & (rows < slot_offsets_ref[pair + 1])
                        for c, (start, width) in enumerate(chunks):
                            cols = pl.ds(n_i * tn + start, width)
                            b = b_ref[pair, cols, :] if transpose_epi else b_ref[pair, :, cols]
                            accs[c] = accs[c] + jnp.where(in_slot[:, None], _dot(h, b, 1, 1 if transpose_epi else 0),
                                                          0.0)
                store(accs)

            @pl.when(jnp.logical_not(live))
            def _zeros():
                store([jnp.zeros((tm, width), jnp.float32) for _, width in chunks])

    inputs = [offsets, group_ids, tile_ids, num_items, lhs, *weights]
    if epilogue:
        inputs += [epi_lhs, epi_rhs, epi_offsets]
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(N // tn, group_ids.shape[0]),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_moe_gmm",
    )(*inputs)


def tgmm(lhs, rhs, offsets, *, num_groups: int, tiles, interpret: bool = False, num_warps: int = NUM_WARPS,
         num_stages: int = NUM_STAGES):
    """out[g] = lhs[rows of g]^T @ rhs[rows of g] in fp32: lhs [M, K], rhs [M, N] -> [G, K, N]. Each program
    owns one (group, K tile, N tile) output block and walks the row tiles its group touches, so empty groups
    write zeros and nothing is accumulated across programs."""
    tm, tk, tn = tiles
    M, K = lhs.shape
    N = rhs.shape[1]
    assert M % tm == 0 and K % tk == 0 and N % tn == 0, (M, K, N, tiles)

    def kernel(offsets_ref, lhs_ref, rhs_ref, out_ref):
        g, k_i, n_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = offsets_ref[g], offsets_ref[g + 1]

        def body(t, acc):
            rows = t * tm + jnp.arange(tm, dtype=jnp.int32)
            in_group = ((rows >= start) & (rows < end))[:, None]
            a = plgpu.load(lhs_ref.at[pl.ds(t * tm, tm), pl.ds(k_i * tk, tk)],
                           mask=jnp.broadcast_to(in_group, (tm, tk)), other=0)
            b = plgpu.load(rhs_ref.at[pl.ds(t * tm, tm), pl.ds(n_i * tn, tn)],
                           mask=jnp.broadcast_to(in_group, (tm, tn)), other=0)
            return acc + _dot(a, b, 0, 0)

        first, last = start // tm, jnp.where(end > start, (end + tm - 1) // tm, start // tm)
        acc = jax.lax.fori_loop(first, last, body, jnp.zeros((tk, tn), jnp.float32))
        out_ref[g, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)] = acc

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, K, N), jnp.float32),
        grid=(num_groups, K // tk, N // tn),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_moe_tgmm",
    )(offsets, lhs, rhs)
