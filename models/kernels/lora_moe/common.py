"""What the LoRA-on-MoE kernels share: tile sizes, the (row tile, group) work lists, and which operands they take.

Groups here are generic: expert groups E for the matmuls against W, (expert, slot) pair groups J = E*X for the
rank-R matmuls. Invariants are checked before anything is traced, with the shapes in the message.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from models.layers.quantized import QUANTIZED, NIBBLES, Fp8Weight, Int4Weight


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Row tile, and the targets for the contraction (k) and output (n) tiles; actual k/n tiles are the
    largest that divide the dimension (see `fit`)."""
    tm: int = 128
    tk: int = 64
    tn: int = 128
    tm_t: int = 64  # rows per step in the factor-gradient (transposed) kernel
    num_warps: int = 4  # Triton only
    num_stages: int = 3  # Triton only


DEFAULT_TILES = {"triton": Tiles(128, 64, 128, 64), "mosaic_tpu": Tiles(128, 512, 256, 128)}


def group_metadata(group_sizes, m: int, tm: int, visit_empty: bool):
    """The (row tile, group) work items for `group_sizes` over `m` rows (m % tm == 0), in group order.

    A group spanning tiles [start//tm, ceil(end/tm)) gets one item per tile, so a tile cut by a group boundary
    is visited once per group, on consecutive items (tiles never decrease). Empty groups get one item only if
    `visit_empty` (the transposed kernel must zero their gradient block). Returns (offsets [G+1], group_ids [I],
    tile_ids [I], num_items [1]) with the static bound I = m//tm + G - 1 >= num_items; items past num_items
    repeat the last group and must be skipped.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    G, tiles_m = group_sizes.shape[0], m // tm
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tm
    count = (ends + tm - 1) // tm - first
    count = jnp.where(group_sizes == 0, 1 if visit_empty else 0, count).astype(jnp.int32)
    bound = tiles_m + G - 1
    group_ids = jnp.repeat(jnp.arange(G, dtype=jnp.int32), count, total_repeat_length=bound)
    item_start = jnp.cumsum(count) - count
    tile_ids = first[group_ids] + jnp.arange(bound, dtype=jnp.int32) - item_start[group_ids]
    tile_ids = jnp.clip(tile_ids, 0, tiles_m - 1).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]).astype(jnp.int32)
    return offsets, group_ids, tile_ids, jnp.sum(count, keepdims=True).astype(jnp.int32)


def fit(dim: int, target: int, backend: str) -> int | None:
    """Largest usable tile for `dim`: Triton wants a power of two >= 16 dividing it; Mosaic wants the whole
    dimension or a multiple of 128 dividing it."""
    if backend == "triton":
        t = 1 << (min(dim, target).bit_length() - 1)
        while t >= 16:
            if dim % t == 0:
                return t
            t //= 2
        return None
    if dim <= target:
        return dim
    align = min(128, target)  # < 128 only for the small tiles of interpret-mode tests
    t = target // align * align
    while t >= align:
        if dim % t == 0:
            return t
        t -= align
    return None


def rank_pad(R: int, backend: str) -> int:
    """Triton dots need power-of-two operands of at least 16; zero columns of A / rows of B are exact."""
    return max(16, 1 << (R - 1).bit_length()) if backend == "triton" else R


def unsupported_reason(x_MD, w_EDF, a_JDR, b_JRF, backend: str, tiles: Tiles | None = None) -> str | None:
    """Why the kernel cannot take these operands (None if it can)."""
    tiles = tiles or DEFAULT_TILES[backend]
    E, D, F = w_EDF.shape
    J, _, R = a_JDR.shape
    if J % E:
        return f"pair groups {J} not a multiple of experts {E}"
    quantized = isinstance(w_EDF, QUANTIZED)
    if x_MD.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16) or (x_MD.dtype != w_EDF.dtype and not quantized):
        return f"dtypes x={x_MD.dtype} w={w_EDF.dtype}"
    tiled = [(rank_pad(R, backend), tiles.tn)]
    if isinstance(w_EDF, Fp8Weight):  # every tile of W must lie in one scale block
        for transpose in (False, True):
            k_tile, n_tile = weight_tiles(w_EDF, tiles, backend, transpose)
            for side, tile, block in ((D, k_tile, w_EDF.block[0]), (F, n_tile, w_EDF.block[1])):
                if tile is None:
                    return f"dimension {side} does not tile for {backend}"
                if block % tile and not tile == side <= block:
                    return f"FP8 scale blocks of {block} do not hold whole {tile}-wide tiles of {side}"
    elif isinstance(w_EDF, Int4Weight):  # D is tiled by its 8-plane blocks; each plane must lie in one scale group
        tiled += [(F, tiles.tn), (F, tiles.tk)]
        P, group = w_EDF.plane, w_EDF.group
        if D % (NIBBLES * P):
            return f"INT4 weights of {D} rows do not hold whole blocks of {NIBBLES} x {P}-row nibble planes"
        if group % P or NIBBLES * P % group:
            return f"INT4 scale groups of {group} rows do not align with {P}-row nibble planes"
        if backend == "triton" and (P < 16 or P & (P - 1)):
            return f"INT4 nibble planes of {P} rows are too small for Triton dots (need a power of two >= 16)"
    else:
        tiled += [(F, tiles.tn), (F, tiles.tk), (D, tiles.tk), (D, tiles.tn)]
    for dim, target in tiled:
        if fit(dim, target, backend) is None:
            return f"dimension {dim} does not tile for {backend}"
    if backend == "mosaic_tpu" and (tiles.tm % 8 or tiles.tm_t % 8):
        return "row tiles must be multiples of 8 on TPU"
    return None


def weight_tiles(w, tiles: Tiles, backend: str, transpose: bool) -> tuple[int | None, int | None]:
    """The tiles of W's [K_w, N_w] sides in the matmul against it (forward: K_w is the contraction, tiled by
    tk; transposed, for dx: K_w is the output, tiled by tn). A 4-bit W's packed side K_w is tiled by its blocks
    of 8 nibble planes; an FP8 W's tiles are cut to fit its scale blocks."""
    K_w, N_w = w.shape[1], w.shape[2]
    k_target, n_target = (tiles.tn, tiles.tk) if transpose else (tiles.tk, tiles.tn)
    if isinstance(w, Fp8Weight):
        k_target, n_target = min(k_target, w.block[0]), min(n_target, w.block[1])
    k_tile = NIBBLES * w.plane if isinstance(w, Int4Weight) else fit(K_w, k_target, backend)
    return k_tile, fit(N_w, n_target, backend)
