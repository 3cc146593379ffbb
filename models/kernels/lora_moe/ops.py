"""The LoRA-on-MoE kernels' custom VJP: forward and backward as calls of the platform kernel (`triton.py`,
`mosaic_tpu.py`), on rows padded to the row tile.

Per projection
  forward:  u = x·A[j] (shrink, fp32);  y = x·W[e] + (s·u)·B[j]  (base matmul, expand fused in its epilogue)
  backward: dh = dy·B[j]^T;  dx = dy·W[e]^T + (s·dh)·A[j]^T (fused again);  dA[j] = x^T·(s·dh);  dB[j] = h^T·dy
and W gets no gradient (it is frozen; the cotangent returned for it is zero). The per-row scale s also gets its
exact gradient (sum(dh·u)), so nothing is silently wrong if someone differentiates it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.kernels.lora_moe.common import Tiles, fit, group_metadata, rank_pad, weight_tiles


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: which kernel, interpreted or compiled, its tiles, and X slots per expert."""

    backend: str
    interpret: bool
    tiles: Tiles
    num_slots: int


def _kernels(backend: str):
    if backend == "triton":
        from models.kernels.lora_moe import triton as k
    else:
        from models.kernels.lora_moe import mosaic_tpu as k
    return k


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _pad_rows(x, rows: int):
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _gmm_call(plan: Plan, lhs, rhs, meta, *, transpose_rhs, out_dtype, epi=None, transpose_epi=False):
    """lhs rows of group g times rhs[g] over `meta`'s groups; `epi` = (h, factors, pair offsets) adds each row's
    slot's LoRA expand."""
    t = plan.tiles
    k_tile, n_tile = weight_tiles(rhs, t, plan.backend, transpose_rhs)
    tiles = (t.tm, n_tile, k_tile) if transpose_rhs else (t.tm, k_tile, n_tile)
    epi_lhs, epi_rhs, epi_offsets = epi if epi is not None else (None, None, None)
    return _kernels(plan.backend).gmm(lhs, rhs, meta, transpose_rhs=transpose_rhs, num_groups=rhs.shape[0],
                                      out_dtype=out_dtype, tiles=tiles, epi_lhs=epi_lhs, epi_rhs=epi_rhs,
                                      epi_offsets=epi_offsets, transpose_epi=transpose_epi,
                                      interpret=plan.interpret, **_compiler(plan))


def _compiler(plan: Plan) -> dict:
    t = plan.tiles
    return {"num_warps": t.num_warps, "num_stages": t.num_stages} if plan.backend == "triton" else {}


def _tgmm_call(plan: Plan, lhs, rhs, pair_sizes, J: int):
    t = plan.tiles
    K, N, Mp = lhs.shape[1], rhs.shape[1], lhs.shape[0]
    tiles = (t.tm_t, fit(K, t.tn, plan.backend), fit(N, t.tn, plan.backend))
    k = _kernels(plan.backend)
    if plan.backend == "triton":
        offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(pair_sizes.astype(jnp.int32))])
        return k.tgmm(lhs, rhs, offsets, num_groups=J, tiles=tiles, interpret=plan.interpret, **_compiler(plan))
    meta = group_metadata(pair_sizes, Mp, t.tm_t, visit_empty=True)
    return k.tgmm(lhs, rhs, meta, num_groups=J, tiles=tiles, interpret=plan.interpret)


class _Groups(NamedTuple):
    """Work lists over pair groups (rank-R matmuls) and expert groups (matmuls against W), each with a tail
    group for padded rows and rows past the groups, which the kernels zero. The pair work list's row offsets
    also mask the slots apart in the expert matmuls' LoRA epilogue."""
    pair_sizes: jax.Array
    pair_meta: tuple
    expert_meta: tuple

    @property
    def pair_offsets(self):
        return self.pair_meta[0]


def _prepare(plan: Plan, x, s, pair_sizes):
    """Pad rows to the row tile and list each kernel's (tile, group) work items."""
    Mp = _round_up(max(x.shape[0], 1), max(plan.tiles.tm, plan.tiles.tm_t))
    pair_sizes = pair_sizes.astype(jnp.int32)
    tail = jnp.asarray([Mp], jnp.int32) - jnp.sum(pair_sizes, keepdims=True)
    expert_sizes = pair_sizes.reshape(-1, plan.num_slots).sum(axis=1)
    groups = _Groups(
        pair_sizes,
        group_metadata(jnp.concatenate([pair_sizes, tail]), Mp, plan.tiles.tm, visit_empty=False),
        group_metadata(jnp.concatenate([expert_sizes, tail]), Mp, plan.tiles.tm, visit_empty=False))
    return _pad_rows(x, Mp), _pad_rows(s, Mp), groups


def _kernel_fwd(plan: Plan, x, w, a, b, s, pair_sizes):
    dt = x.dtype
    xp, sp, groups = _prepare(plan, x, s, pair_sizes)
    u = _gmm_call(plan, xp, a.astype(dt), groups.pair_meta, transpose_rhs=False, out_dtype=jnp.float32)
    h = (u * sp.astype(jnp.float32)[:, None]).astype(dt)
    y = _gmm_call(plan, xp, w, groups.expert_meta, transpose_rhs=False, out_dtype=dt,
                  epi=(h, b.astype(dt), groups.pair_offsets))
    return y[:x.shape[0]], (xp, w, a, b, sp, u, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_lora_gmm(plan: Plan, x, w, a, b, s, pair_sizes):
    return _kernel_fwd(plan, x, w, a, b, s, pair_sizes)[0]


def _kernel_vjp_bwd(plan, res, dy):
    xp, w, a, b, sp, u, groups = res
    M, dt, J = dy.shape[0], xp.dtype, a.shape[0]
    s32 = sp.astype(jnp.float32)[:, None]
    dyp = _pad_rows(dy.astype(dt), xp.shape[0])
    dh = _gmm_call(plan, dyp, b.astype(dt), groups.pair_meta, transpose_rhs=True, out_dtype=jnp.float32)
    ds = jnp.sum(dh * u, axis=1)[:M]
    dhs, h = (dh * s32).astype(dt), (u * s32).astype(dt)
    dx = _gmm_call(plan, dyp, w, groups.expert_meta, transpose_rhs=True, out_dtype=dt,
                   epi=(dhs, a.astype(dt), groups.pair_offsets), transpose_epi=True)[:M]
    da = _tgmm_call(plan, xp, dhs, groups.pair_sizes, J)
    db = _tgmm_call(plan, h, dyp, groups.pair_sizes, J)
    return (dx, jax.tree.map(_zero_cotangent, w), da.astype(a.dtype), db.astype(b.dtype), ds.astype(sp.dtype),
            _zero_cotangent(groups.pair_sizes))


def _zero_cotangent(t):
    return jnp.zeros_like(t) if jnp.issubdtype(t.dtype, jnp.floating) else np.zeros(t.shape, jax.dtypes.float0)


_kernel_lora_gmm.defvjp(_kernel_fwd, _kernel_vjp_bwd)


def kernel_lora_gmm(plan: Plan, x, w, a, b, s, pair_sizes):
    """The custom-VJP kernel on rank-padded factors, cut back so dA/dB have the caller's shapes."""
    R = a.shape[2]
    Rp = rank_pad(R, plan.backend)
    if Rp != R:  # pad outside the custom VJP so the padding's own VJP slices the factor gradients back
        a = jnp.pad(a, ((0, 0), (0, 0), (0, Rp - R)))
        b = jnp.pad(b, ((0, 0), (0, Rp - R), (0, 0)))
    return _kernel_lora_gmm(plan, x, w, a, b, s, pair_sizes)


