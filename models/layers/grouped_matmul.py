"""Grouped matmul for dropless MoE: rows sorted by group, each group multiplied by its own weight matrix.

`gmm(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N]`, rows past sum(group_sizes) give zeros.

Implementations:
- "ragged": `jax.lax.ragged_dot`, the readable reference and the accelerator default. On CPU jax lowers it to
  a masked matmul over every group (G times the work), so it is not the CPU default.
- "loop": a loop over row blocks of the groups (whole blocks, then each group's remainder in small blocks);
  each block multiplies only its group's rows by that group's weight, so the work is proportional to the
  routed rows. A custom VJP gives dx (the same loop against the transposed weight, without copying it) and dw
  (per-group x^T dy).
- "dense": every row times every group's weight, masked (tests only).
- "blocked": each group's rows padded to whole blocks, every block times its group's weight (gathered per
  block). No control flow, so its compiled cost is exactly rows x K x N (plus one block per group): what the
  expert-parallel FLOP accounting measures. The weight gather costs a copy per block: small experts only.

`w` may be an `Int4Weight` or `Fp8Weight` (frozen quantized weights, `models/layers/quantized.py`): the loop
dequantizes one group's matrix at a time, so it is the default for them on every backend; the other
implementations dequantize the whole stack first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.layers.quantized import QUANTIZED, dequantized, matrix, slice_groups

IMPLS = ("auto", "loop", "ragged", "dense", "blocked")


def default_impl() -> str:
    return "loop" if jax.default_backend() == "cpu" else "ragged"


def block_rows(num_rows: int, num_groups: int) -> int:
    """Rows per block: about the mean group size, a power of two in [4, 128]. Small blocks are for decoding
    (a few rows per expert): there a block's cost grows with its rows, padded or not, so 4-row blocks beat
    8-row ones by about 5% of a decode step."""
    mean = max(1, num_rows // max(num_groups, 1))
    return int(min(128, max(4, 1 << (mean - 1).bit_length())))


def gmm(x, w, group_sizes, impl: str = "auto", first_group=None):
    """`first_group` (an int32 scalar, may be traced): the groups are w[first_group : first_group + G] of a
    larger stack, e.g. every layer's experts flattened to [L*E, K, N]. The loop reads them in place; the other
    implementations slice them out first (a copy of the layer's experts)."""
    if impl == "auto":
        impl = "loop" if isinstance(w, QUANTIZED) else default_impl()
    if first_group is not None and impl != "loop":
        w = slice_groups(w, first_group, group_sizes.shape[0])
    if impl != "loop":
        w = dequantized(w, x.dtype)
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32))
    if impl == "loop":
        first = jnp.zeros((), jnp.int32) if first_group is None else jnp.asarray(first_group, jnp.int32)
        return _loop_gmm(x, w, group_sizes.astype(jnp.int32), first,
                         block_rows(x.shape[0], group_sizes.shape[0]))
    if impl == "dense":
        return _dense_gmm(x, w, group_sizes)
    if impl == "blocked":
        return _blocked_gmm(x, w, group_sizes.astype(jnp.int32), 8)
    raise ValueError(f"unknown grouped-matmul implementation {impl!r}; expected one of {IMPLS}")


def _row_groups(group_sizes, num_rows):
    """Group id of every row (== num_groups for rows past the last group)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right")


def _dense_gmm(x, w, group_sizes):
    onehot_MG = jax.nn.one_hot(_row_groups(group_sizes, x.shape[0]), w.shape[0], dtype=x.dtype)
    return jnp.einsum("MK,GKN,MG->MN", x, w, onehot_MG)


def _blocked_gmm(x, w, group_sizes, block: int):
    """Rows scattered into per-group runs of whole blocks, one batched matmul over blocks, gathered back."""
    M, G = x.shape[0], w.shape[0]
    num_blocks = -(-M // block) + G  # every group wastes less than one block
    starts = jnp.cumsum(group_sizes) - group_sizes
    padded = (group_sizes + block - 1) // block * block
    padded_starts = jnp.cumsum(padded) - padded
    group_M = _row_groups(group_sizes, M)
    g = jnp.minimum(group_M, G - 1)
    dest_M = jnp.where(group_M < G, padded_starts[g] + jnp.arange(M) - starts[g], num_blocks * block)
    x_blocks = jnp.zeros((num_blocks * block, x.shape[1]), x.dtype).at[dest_M].set(x, mode="drop")
    block_group = _row_groups(padded // block, num_blocks)
    w_blocks = w[jnp.minimum(block_group, G - 1)]
    y = jnp.einsum("nbK,nKN->nbN", x_blocks.reshape(num_blocks, block, -1), w_blocks,
                   preferred_element_type=jnp.float32).astype(x.dtype)
    y = y.reshape(num_blocks * block, -1)[jnp.minimum(dest_M, num_blocks * block - 1)]
    return jnp.where((group_M < G)[:, None], y, 0)


def _small_block(big: int) -> int:
    return min(big, 16)


def _group_loop(x_rows, group_sizes, big: int, init, group_fn, block_fn):
    """Run `block_fn(carry, group_value, row0, rows, valid)` over every row block of every group, in order.

    A group's first `size % big` rows (its tail) go in blocks of `small` rows, the rest in whole `big` blocks,
    so the rows computed and thrown away are under `small` per group instead of under `big` (with 128-row
    blocks and ~256-row groups that waste was a fifth of all matmul work). Whole blocks lie inside the group
    (`valid` is None); tail blocks are masked by `valid` and, at the end of the rows, shifted back to stay in
    bounds, so nothing is padded. When `big == small` (decoding: a few rows per group) every block is a tail
    block, one loop per group. `group_fn(g)` runs once per group, e.g. to slice its weight once rather than
    once per block (a slice that feeds a matmul is a copy). Block counts are worked out for all groups before
    the loop (shifts: the block sizes are powers of two), because each scalar op in the loop is a step of the
    loop's critical path."""
    small = _small_block(big)
    starts = jnp.cumsum(group_sizes) - group_sizes
    tails = group_sizes if big == small else group_sizes & (big - 1)
    tail_blocks = (tails + small - 1) >> (small.bit_length() - 1)
    whole_blocks = group_sizes >> (big.bit_length() - 1)

    def group_body(g, carry):
        start, tail = starts[g], tails[g]
        value = group_fn(g)

        def whole_block(j, carry):
            return block_fn(carry, value, start + tail + j * big, big, None)

        def tail_block(j, carry):
            first = start + j * small
            row0 = jnp.minimum(first, x_rows - small)
            rows = row0 + jnp.arange(small)
            valid = (rows >= first) & (rows < start + tail)
            return block_fn(carry, value, row0, small, valid)

        if big != small:
            carry = jax.lax.fori_loop(0, whole_blocks[g], whole_block, carry)
        return jax.lax.fori_loop(0, tail_blocks[g], tail_block, carry)

    return jax.lax.fori_loop(0, group_sizes.shape[0], group_body, init)


def _gmm_loop(x, w, group_sizes, first, block: int, transpose_w: bool):
    """x [M, K] times w[first + g] ([K, N], or [N, K] used transposed) per row group, block by block (see
    `_group_loop`); x is padded only when it has fewer rows than one block."""
    M, small = x.shape[0], _small_block(block)
    if M < small:
        return _gmm_loop(jnp.pad(x, ((0, small - M), (0, 0))), w, group_sizes, first, block, transpose_w)[:M]
    out_features = w.shape[1] if transpose_w else w.shape[2]
    spec = "MN,KN->MK" if transpose_w else "MK,KN->MN"

    def block_fn(out, w_g, row0, rows, valid):
        x_rows = jax.lax.dynamic_slice_in_dim(x, row0, rows)
        y = jnp.einsum(spec, x_rows, w_g, preferred_element_type=jnp.float32).astype(out.dtype)
        if valid is not None:
            y = jnp.where(valid[:, None], y, jax.lax.dynamic_slice_in_dim(out, row0, rows))
        return jax.lax.dynamic_update_slice_in_dim(out, y, row0, 0)

    out = jnp.zeros((M, out_features), x.dtype)
    return _group_loop(M, group_sizes, block, out, lambda g: matrix(w, first + g, x.dtype), block_fn)


def _tgmm_loop(x, dy, group_sizes, block: int, dtype):
    """Per-group x^T dy: [G, K, N]. A tail block's rows outside the group are masked in both x and dy: masking
    x alone lets another group's inf dy in as 0 * inf = NaN (one tenant's overflow poisoning another's experts)."""
    M, small = x.shape[0], _small_block(block)
    if M < small:
        pad = ((0, small - M), (0, 0))
        return _tgmm_loop(jnp.pad(x, pad), jnp.pad(dy, pad), group_sizes, block, dtype)

    def block_fn(out, g, row0, rows, valid):
        rows_x = jax.lax.dynamic_slice_in_dim(x, row0, rows)
        rows_dy = jax.lax.dynamic_slice_in_dim(dy, row0, rows)
        if valid is not None:
            rows_x = jnp.where(valid[:, None], rows_x, 0)
            rows_dy = jnp.where(valid[:, None], rows_dy, 0)
        return out.at[g].add(jnp.einsum("MK,MN->KN", rows_x, rows_dy, preferred_element_type=jnp.float32))

    out = jnp.zeros((group_sizes.shape[0], x.shape[1], dy.shape[1]), jnp.float32)
    return _group_loop(M, group_sizes, block, out, lambda g: g, block_fn).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loop_gmm(x, w, group_sizes, first, block):
    return _gmm_loop(x, w, group_sizes, first, block, transpose_w=False)


def _loop_gmm_fwd(x, w, group_sizes, first, block):
    """With symbolic zeros: a frozen weight (no tangent) gets no dw, and x is not even kept for it. Under
    expert-parallel rounds an unneeded dw would otherwise be formed per round and survive as a stacked buffer."""
    w_value = jax.tree.map(lambda leaf: leaf.value, w, is_leaf=_is_primal)
    trains_w = not isinstance(w_value, QUANTIZED) and w.perturbed  # quantized weights are frozen by construction
    out = _gmm_loop(x.value, w_value, group_sizes.value, first.value, block, transpose_w=False)
    return out, (x.value if trains_w else None, w_value, group_sizes.value, first.value,
                 jnp.zeros((0,), x.value.dtype))


def _is_primal(leaf) -> bool:
    return isinstance(leaf, jax.custom_derivatives.CustomVJPPrimal)


def _loop_gmm_bwd(block, residuals, dy):
    x, w, group_sizes, first, x_dtype = residuals
    dx = _gmm_loop(dy, w, group_sizes, first, block, transpose_w=True).astype(x_dtype.dtype)
    dw = None
    if x is not None:
        dw_G = _tgmm_loop(x, dy, group_sizes, block, w.dtype)
        dw = dw_G if dw_G.shape == w.shape else jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(w), dw_G, first, 0)
    return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0), np.zeros((), jax.dtypes.float0)


_loop_gmm.defvjp(_loop_gmm_fwd, _loop_gmm_bwd, symbolic_zeros=True)
