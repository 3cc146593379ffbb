"""The grouped matmul behind the MoE layer: every implementation against the others, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.layers.grouped_matmul import gmm

# Ragged group sizes with empty groups, single-row groups, and rows past the last group (must give zeros).
GROUP_SIZES = np.array([0, 5, 1, 0, 17, 1, 9, 0], np.int32)
M, K, N = 40, 12, 7  # sum(GROUP_SIZES) = 33 < M


def _inputs(dtype):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(GROUP_SIZES), K, N), jnp.float32).astype(dtype)
    return x, w, jnp.asarray(GROUP_SIZES)


def _numpy_reference(x, w, sizes):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, row = np.zeros((x.shape[0], w.shape[2])), 0
    for g, n in enumerate(sizes):
        out[row:row + n] = x[row:row + n] @ w[g]
        row += n
    return out


@pytest.mark.parametrize("impl", ["loop", "ragged", "dense"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_forward_matches_per_group_reference(impl, dtype, tol):
    x, w, sizes = _inputs(dtype)
    out = jax.jit(lambda x, w, s: gmm(x, w, s, impl))(x, w, sizes)
    expected = _numpy_reference(x, w, GROUP_SIZES)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tol * np.abs(expected).max(), rtol=0)
    assert np.all(np.asarray(out[GROUP_SIZES.sum():]) == 0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_loop_gradients_match_ragged_dot(dtype, tol):
    x, w, sizes = _inputs(dtype)
    cotangent = jax.random.normal(jax.random.key(1), (M, N), jnp.float32).astype(dtype)

    def grads(impl):
        loss = lambda x, w: jnp.sum(gmm(x, w, sizes, impl).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    (dx, dw), (dx_ref, dw_ref) = grads("loop"), grads("ragged")
    for got, ref in ((dx, dx_ref), (dw, dw_ref)):
        ref = np.asarray(ref, np.float64)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=tol * np.abs(ref).max(), rtol=0)
    assert np.all(np.asarray(dw)[GROUP_SIZES == 0] == 0)  # empty groups get no gradient
    assert np.all(np.asarray(dx)[GROUP_SIZES.sum():] == 0)  # nor do rows past the last group


def test_unknown_impl_is_rejected():
    x, w, sizes = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="unknown grouped-matmul implementation 'fast'"):
        gmm(x, w, sizes, "fast")
