"""The grouped matmul behind the MoE layer: every implementation against the others, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers.grouped_matmul import gmm

# Ragged group sizes with empty groups, single-row groups, and rows past the last group (must give zeros).
GROUP_SIZES = np.array([0, 5, 1, 0, 17, 1, 9, 0], np.int32)
M, K, N = 40, 12, 7  # sum(GROUP_SIZES) = 33 < M
# Decode-like: a few rows per group, so the loop uses its smallest (4-row) blocks, with groups of 5 and 6 rows
# that span a whole block and a masked tail.
FEW_ROWS_PER_GROUP = np.array([0, 3, 1, 0, 5, 1, 2, 0, 4, 0, 1, 6, 0, 2, 1, 0], np.int32)
SIZES = pytest.mark.parametrize("group_sizes", [GROUP_SIZES, FEW_ROWS_PER_GROUP], ids=["ragged", "few_rows"])


def _inputs(dtype, group_sizes=GROUP_SIZES):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(group_sizes), K, N), jnp.float32).astype(dtype)
    return x, w, jnp.asarray(group_sizes)


def _numpy_reference(x, w, sizes):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, row = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(sizes):
        out[row:row + n] = x[row:row + n] @ w[g]
        row += n
    return out


@SIZES
@pytest.mark.parametrize("impl", ["loop", "ragged", "dense"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_forward_matches_per_group_reference(impl, dtype, tol, group_sizes):
    x, w, sizes = _inputs(dtype, group_sizes)
    out = jax.jit(lambda x, w, s: gmm(x, w, s, impl))(x, w, sizes)
    expected = _numpy_reference(x, w, group_sizes)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tol * np.abs(expected).max(), rtol=0)
    assert np.all(np.asarray(out[group_sizes.sum():]) == 0)


@SIZES
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_loop_gradients_match_ragged_dot(dtype, tol, group_sizes):
    x, w, sizes = _inputs(dtype, group_sizes)
    cotangent = jax.random.normal(jax.random.key(1), (M, N), jnp.float32).astype(dtype)

    def grads(impl):
        loss = lambda x, w: jnp.sum(gmm(x, w, sizes, impl).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    (dx, dw), (dx_ref, dw_ref) = grads("loop"), grads("ragged")
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        ref = np.asarray(ref, np.float64)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=tol * np.abs(ref).max(), rtol=0)
    assert np.all(np.asarray(dw)[group_sizes == 0] == 0)  # empty groups get no gradient
    assert np.all(np.asarray(dx)[group_sizes.sum():] == 0)  # nor do rows past the last group


def test_unknown_impl_is_rejected():
    x, w, sizes = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="unknown grouped-matmul implementation 'fast'"):
        gmm(x, w, sizes, "fast")


@pytest.mark.parametrize("impl", ["loop", "ragged"])
def test_large_groups_and_a_layers_experts_read_in_place(impl):
    """Groups of hundreds of rows (whole 128-row blocks plus 16-row tails, the last one at the end of x), and
    the groups taken as w[first_group : first_group + G] of a stack of two layers' experts, with gradients."""
    sizes = np.array([0, 300, 1, 129, 0, 270, 7], np.int32)
    rows, G, K, N = int(sizes.sum()), len(sizes), 24, 20
    kx, kw, kc = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (rows, K), jnp.float32)
    w_stack = jax.random.normal(kw, (2 * G, K, N), jnp.float32)
    cotangent = jax.random.normal(kc, (rows, N), jnp.float32)

    def loss(x, w):
        return jnp.sum(gmm(x, w, jnp.asarray(sizes), impl, first_group=jnp.int32(G)) * cotangent)

    out = jax.jit(lambda x, w: gmm(x, w, jnp.asarray(sizes), impl, first_group=jnp.int32(G)))(x, w_stack)
    expected = _numpy_reference(x, w_stack[G:], sizes)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w_stack)
    c = np.asarray(cotangent, np.float64)
    w64, x64 = np.asarray(w_stack, np.float64)[G:], np.asarray(x, np.float64)
    dx_ref, dw_ref, row = np.zeros_like(x64), np.zeros_like(w64), 0
    for g, n in enumerate(sizes):
        dx_ref[row:row + n] = c[row:row + n] @ w64[g].T
        dw_ref[g] = x64[row:row + n].T @ c[row:row + n]
        row += n
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx_ref, atol=1e-5 * np.abs(dx_ref).max(), rtol=0)
    np.testing.assert_allclose(np.asarray(dw, np.float64)[G:], dw_ref, atol=1e-5 * np.abs(dw_ref).max(), rtol=0)
    assert np.all(np.asarray(dw)[:G] == 0)  # the other layer's experts get no gradient


@SIZES
def test_a_non_finite_cotangent_in_one_group_leaves_the_other_groups_gradients_exact(group_sizes):
    """One tenant's overflowing loss must not reach another's expert gradients: the loop's tail blocks read
    rows of neighbouring groups, so those rows' dy must be masked too (0 * inf is NaN)."""
    x, w, sizes = _inputs(jnp.float32, group_sizes)
    clean = jax.random.normal(jax.random.key(1), (M, N), jnp.float32)
    bad_group = int(np.argmax(group_sizes))  # the largest group: its rows neighbour others' tail blocks
    start = int(group_sizes[:bad_group].sum())
    rows = np.arange(M)
    poisoned = jnp.where(((rows >= start) & (rows < start + group_sizes[bad_group]))[:, None],
                         jnp.asarray([[np.inf], [1e38]])[rows % 2], clean)

    def grads(cotangent):
        loss = lambda x, w: jnp.sum(gmm(x, w, sizes, "loop") * cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    (dx, dw), (dx_ref, dw_ref) = grads(poisoned), grads(clean)
    others = np.arange(len(group_sizes)) != bad_group
    np.testing.assert_array_equal(np.asarray(dw)[others], np.asarray(dw_ref)[others])
    other_rows = (rows < start) | (rows >= start + group_sizes[bad_group])
    np.testing.assert_array_equal(np.asarray(dx)[other_rows], np.asarray(dx_ref)[other_rows])
