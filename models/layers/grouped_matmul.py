"""Grouped matmul for dropless MoE: rows sorted by group, each group multiplied by its own weight matrix.

`gmm(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N]`, rows past sum(group_sizes) give zeros.

Implementations:
- "ragged": `jax.lax.ragged_dot`, the readable reference and the accelerator default. On CPU jax lowers it to
  a masked matmul over every group (G times the work), so it is not the CPU default.
- "loop": a loop over groups and, inside, over row blocks of that group; each group's weight is read in
  place once and only its own rows are multiplied, so the work is proportional to the routed rows. A custom
  VJP gives dx (the same loop against the transposed weight, without copying it) and dw (per-group x^T dy).
- "dense": every row times every group's weight, masked (tests only).
- "blocked": each group's rows padded to whole blocks, every block times its group's weight (gathered per
  block). No control flow, so its compiled cost is exactly rows x K x N (plus one block per group): what the
  expert-parallel FLOP accounting measures. The weight gather costs a copy per block: small experts only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "loop", "ragged", "dense", "blocked")


def default_impl() -> str:
    return "loop" if jax.default_backend() == "cpu" else "ragged"


def block_rows(num_rows: int, num_groups: int) -> int:
    """Rows per block: about the mean group size, a power of two in [8, 128]."""
    mean = max(1, num_rows // max(num_groups, 1))
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def gmm(x, w, group_sizes, impl: str = "auto"):
    if impl == "auto":
        impl = default_impl()
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32))
    if impl == "loop":
        return _loop_gmm(x, w, group_sizes.astype(jnp.int32), block_rows(x.shape[0], w.shape[0]))
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


def _blocked_loop(group_sizes, block: int, init, block_fn):
    """Run block_fn(carry, g, row0, valid_rows) over every row block of every group, in order."""
    starts = jnp.cumsum(group_sizes) - group_sizes

    def group_body(g, carry):
        start, size = starts[g], group_sizes[g]

        def block_body(b, carry):
            offset = b * block
            valid = (jnp.arange(block) + offset) < size
            return block_fn(carry, g, start + offset, valid)

        return jax.lax.fori_loop(0, (size + block - 1) // block, block_body, carry)

    return jax.lax.fori_loop(0, group_sizes.shape[0], group_body, init)


def _gmm_loop(x, w, group_sizes, block: int, transpose_w: bool):
    """x [M, K] times w[g] ([K, N], or [N, K] used transposed) per row group; rows are padded by one block so
    that every block slice stays in bounds (dynamic_slice would otherwise shift it back over earlier rows)."""
    M = x.shape[0]
    out_features = w.shape[1] if transpose_w else w.shape[2]
    spec = "MN,KN->MK" if transpose_w else "MK,KN->MN"
    x_pad = jnp.pad(x, ((0, block), (0, 0)))

    def block_fn(out, g, row0, valid):
        rows = jax.lax.dynamic_slice_in_dim(x_pad, row0, block)
        y = jnp.einsum(spec, rows, w[g], preferred_element_type=jnp.float32).astype(out.dtype)
        old = jax.lax.dynamic_slice_in_dim(out, row0, block)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None], y, old), row0, 0)

    out = jnp.zeros((M + block, out_features), x.dtype)
    return _blocked_loop(group_sizes, block, out, block_fn)[:M]


def _tgmm_loop(x, dy, group_sizes, block: int, dtype):
    """Per-group x^T dy: [G, K, N]."""
    x_pad = jnp.pad(x, ((0, block), (0, 0)))
    dy_pad = jnp.pad(dy, ((0, block), (0, 0)))

    def block_fn(out, g, row0, valid):
        rows_x = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(x_pad, row0, block), 0)
        rows_dy = jax.lax.dynamic_slice_in_dim(dy_pad, row0, block)
        return out.at[g].add(jnp.einsum("MK,MN->KN", rows_x, rows_dy, preferred_element_type=jnp.float32))

    out = jnp.zeros((group_sizes.shape[0], x.shape[1], dy.shape[1]), jnp.float32)
    return _blocked_loop(group_sizes, block, out, block_fn).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loop_gmm(x, w, group_sizes, block):
    return _gmm_loop(x, w, group_sizes, block, transpose_w=False)


def _loop_gmm_fwd(x, w, group_sizes, block):
    """With symbolic zeros: a frozen weight (no tangent) gets no dw, and x is not even kept for it. Under
    expert-parallel rounds an unneeded dw would otherwise be formed per round and survive as a stacked buffer."""
    out = _gmm_loop(x.value, w.value, group_sizes.value, block, transpose_w=False)
    return out, (x.value if w.perturbed else None, w.value, group_sizes.value, jnp.zeros((0,), x.value.dtype))


def _loop_gmm_bwd(block, residuals, dy):
    x, w, group_sizes, x_dtype = residuals
    dx = _gmm_loop(dy, w, group_sizes, block, transpose_w=True).astype(x_dtype.dtype)
    dw = None if x is None else _tgmm_loop(x, dy, group_sizes, block, w.dtype)
    return dx, dw, np.zeros(group_sizes.shape, jax.dtypes.float0)


_loop_gmm.defvjp(_loop_gmm_fwd, _loop_gmm_bwd, symbolic_zeros=True)
