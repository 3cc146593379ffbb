"""TPU (Pallas Mosaic) kernels behind `lora_gmm`, in the megablox style: the tile->group metadata is scalar
prefetch, so BlockSpec index maps pick each step's row tile and expert/adapter weights, and the grid's item
axis has a data-dependent length (only the (tile, group) pairs that exist are visited).

A row tile shared by several groups is visited once per group on consecutive steps; its output block stays
in VMEM between them and each visit writes only its own rows. Runs on CPU under `pltpu.InterpretParams()`
(TPU interpret mode simulates VMEM, the pipeline's DMAs and block revisiting).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from models.layers.quantized import NIBBLES, Fp8Weight, Int4Weight, nibble_plane


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _dot(a, b, contract_a: int, contract_b: int):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def gmm(lhs, rhs, meta, *, transpose_rhs: bool, num_groups: int, out_dtype, tiles, epi_lhs=None, epi_rhs=None,
        epi_offsets=None, transpose_epi: bool = False, interpret: bool = False):
    """Same contract as `triton.gmm`."""
    tm, tk, tn = tiles
    M, K = lhs.shape
    int4, fp8 = isinstance(rhs, Int4Weight), isinstance(rhs, Fp8Weight)
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    offsets, group_ids, tile_ids, num_items = meta
    epilogue = epi_lhs is not None
    tiles_k = K // tk
    assert M % tm == 0 and K % tk == 0 and N % tn == 0, (M, K, N, tiles)
    if epilogue:
        R = epi_lhs.shape[1]
        num_slots = epi_rhs.shape[0] // num_groups
        # [G*X, R, N] -> [G, X, R, N] (free): one block brings every slot's factor of the tile's group
        epi_rhs = epi_rhs.reshape((num_groups, num_slots) + epi_rhs.shape[1:])
    else:
        epi_offsets = jnp.zeros((1,), jnp.int32)
    if int4:
        P, group = rhs.plane, rhs.group
        scale_rows = NIBBLES * P // group  # scale rows per 8P-row block of the packed side
        assert (tn if transpose_rhs else tk) == NIBBLES * P and scale_rows >= 1, (tiles, P, group)

    def base_product(lhs_tile, rhs_refs):
        """This K step's lhs tile times the rhs tile, [tm, tn] in fp32."""
        if fp8:  # the tile lies in one scale block: its scale is a [1, 1] block
            w = (rhs_refs[0][...].astype(jnp.float32) * rhs_refs[1][...]).astype(lhs_tile.dtype)
            return _dot(lhs_tile, w, 1, 1 if transpose_rhs else 0)
        if not int4:
            return _dot(lhs_tile, rhs_refs[0][...], 1, 1 if transpose_rhs else 0)
        words, scales = rhs_refs[0][...], rhs_refs[1][...]
        planes = [nibble_plane(words, j, scales[j * P // group][None, :], lhs_tile.dtype) for j in range(NIBBLES)]
        if transpose_rhs:  # the output columns are the packed side: plane j gives columns j*P..
            return jnp.concatenate([_dot(lhs_tile, w, 1, 1) for w in planes], axis=1)
        return sum(_dot(lhs_tile[:, j * P:(j + 1) * P], w, 1, 0) for j, w in enumerate(planes))

    num_weights = 2 if int4 or fp8 else 1

    def kernel(offsets_ref, gids_ref, tids_ref, slot_offsets_ref, lhs_ref, *rest):
        rhs_refs, rest = rest[:num_weights], rest[num_weights:]
        out_ref, acc_ref = rest[-2], rest[-1]
        item, k_i = pl.program_id(1), pl.program_id(2)
        g = gids_ref[item]
        live = g < num_groups

        @pl.when(k_i == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(live)
        def _():
            acc_ref[...] += base_product(lhs_ref[...], rhs_refs)

        @pl.when(k_i == tiles_k - 1)
        def _():
            acc = acc_ref[...]
            rows = tids_ref[item] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            if epilogue:
                h_ref, b_ref = rest[0], rest[1]
                h = h_ref[...]
                for slot in range(num_slots):  # slots masked apart (after the dot: 0 * another slot's NaN is NaN)
                    pair = jnp.minimum(g, num_groups - 1) * num_slots + slot
                    in_slot = (rows >= slot_offsets_ref[pair]) & (rows < slot_offsets_ref[pair + 1])
                    acc = acc + jnp.where(in_slot, _dot(h, b_ref[slot], 1, 1 if transpose_epi else 0), 0.0)
            acc = jnp.where(live, acc, 0.0)
            mask = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
            out_ref[...] = jnp.where(mask, acc, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

    def group_block(i, gids):
        return jnp.minimum(gids[i], num_groups - 1)

    # index maps get the grid indices (n, i, k) and the scalar-prefetch refs (offsets, group ids, tile ids, slot
    # offsets); `*_` takes the ones a map does not use
    def rows_of(n, i, k, offs, gids, tids, *_):
        return tids[i]

    def group_of(n, i, k, offs, gids, *_):
        return group_block(i, gids)

    in_specs = [pl.BlockSpec((tm, tk), lambda n, i, k, *s: (rows_of(n, i, k, *s), k))]
    if int4:  # packed [G, K/8, N] and scales [G, K/group, N], in 8P-row blocks of the packed side
        if transpose_rhs:
            in_specs += [pl.BlockSpec((None, P, tk), lambda n, i, k, *s: (group_of(n, i, k, *s), n, k)),
                         pl.BlockSpec((None, scale_rows, tk), lambda n, i, k, *s: (group_of(n, i, k, *s), n, k))]
        else:
            in_specs += [pl.BlockSpec((None, P, tn), lambda n, i, k, *s: (group_of(n, i, k, *s), k, n)),
                         pl.BlockSpec((None, scale_rows, tn), lambda n, i, k, *s: (group_of(n, i, k, *s), k, n))]
        inputs = [lhs, rhs.packed, rhs.scale]
    elif fp8:  # values as a plain weight; the scale block of the tile's (K, N) block
        bk, bn = rhs.block
        if transpose_rhs:
            in_specs += [pl.BlockSpec((None, tn, tk), lambda n, i, k, *s: (group_of(n, i, k, *s), n, k)),
                         pl.BlockSpec((None, 1, 1), lambda n, i, k, *s: (group_of(n, i, k, *s), n * tn // bk,
                                                                          k * tk // bn))]
        else:
            in_specs += [pl.BlockSpec((None, tk, tn), lambda n, i, k, *s: (group_of(n, i, k, *s), k, n)),
                         pl.BlockSpec((None, 1, 1), lambda n, i, k, *s: (group_of(n, i, k, *s), k * tk // bk,
                                                                          n * tn // bn))]
        inputs = [lhs, rhs.values, rhs.scale]
    else:
        in_specs.append(
            pl.BlockSpec((None, tn, tk), lambda n, i, k, *s: (group_of(n, i, k, *s), n, k)) if transpose_rhs
            else pl.BlockSpec((None, tk, tn), lambda n, i, k, *s: (group_of(n, i, k, *s), k, n)))
        inputs = [lhs, rhs]
    if epilogue:
        in_specs.append(pl.BlockSpec((tm, R), lambda n, i, k, *s: (rows_of(n, i, k, *s), 0)))
        in_specs.append(
            pl.BlockSpec((None, num_slots, tn, R), lambda n, i, k, *s: (group_of(n, i, k, *s), 0, n, 0))
            if transpose_epi else
            pl.BlockSpec((None, num_slots, R, tn), lambda n, i, k, *s: (group_of(n, i, k, *s), 0, 0, n)))
        inputs += [epi_lhs, epi_rhs]
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda n, i, k, *s: (rows_of(n, i, k, *s), n)),
            grid=(N // tn, num_items[0], tiles_k),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
        name="lora_moe_gmm",
    )
    return call(offsets, group_ids, tile_ids, epi_offsets, *inputs)


def tgmm(lhs, rhs, meta, *, num_groups: int, tiles, interpret: bool = False):
    """out[g] = lhs[rows of g]^T @ rhs[rows of g] in fp32: lhs [M, K], rhs [M, N] -> [G, K, N]. `meta` visits
    every group at least once (empty groups too, to zero their block); steps of one group are consecutive,
    so its output block accumulates in VMEM and is written when the group changes."""
    tm, tk, tn = tiles
    M, K = lhs.shape
    N = rhs.shape[1]
    offsets, group_ids, tile_ids, num_items = meta
    assert M % tm == 0 and K % tk == 0 and N % tn == 0, (M, K, N, tiles)

    def kernel(offsets_ref, gids_ref, tids_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        item = pl.program_id(2)
        g = gids_ref[item]
        prev = gids_ref[jnp.maximum(item - 1, 0)]
        nxt = gids_ref[jnp.minimum(item + 1, pl.num_programs(2) - 1)]
        start, end = offsets_ref[g], offsets_ref[g + 1]

        @pl.when((item == 0) | (prev != g))
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(end > start)
        def _():
            rows = tids_ref[item] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
            in_group = (rows >= start) & (rows < end)
            a = jnp.where(in_group, lhs_ref[...], jnp.zeros_like(lhs_ref[...]))
            b = jnp.where(in_group, rhs_ref[...], jnp.zeros_like(rhs_ref[...]))
            acc_ref[...] += _dot(a.T, b, 1, 0)

        @pl.when((item == pl.num_programs(2) - 1) | (nxt != g))
        def _():
            out_ref[...] = acc_ref[...]

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, K, N), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            in_specs=[pl.BlockSpec((tm, tk), lambda n, k, i, offs, gids, tids: (tids[i], k)),
                      pl.BlockSpec((tm, tn), lambda n, k, i, offs, gids, tids: (tids[i], n))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda n, k, i, offs, gids, tids: (gids[i], k, n)),
            grid=(N // tn, K // tk, num_items[0]),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
        name="lora_moe_tgmm",
    )
    return call(offsets, group_ids, tile_ids, lhs, rhs)
