"""LoRA on routed experts as Pallas kernels: `y = x·W[e] + s·(x·A[g])·B[g]` over rows sorted into (expert,
adapter-slot) pair groups, forward and backward.

Rows are sorted expert-major, slot-minor (as `RoutedExperts` does), so pair group g = e*X + slot refines expert
group e = g // X. The big matmuls (against W) run over expert groups: a row tile is computed once per expert it
holds, and the adapter slots inside it are masked apart only in the LoRA epilogue. (Over pair groups, a tile
cut by slot boundaries would repeat its whole base matmul per slot: 2.75x the tiles at Qwen3-30B-A3B's routing
with 4 slots and 128-row tiles, against 1.46x over expert groups.) The rank-R matmuls run over pair groups.
Per projection the kernels do
  forward:  u = x·A[g] (shrink, fp32);  y = x·W[e] + (s·u)·B[g]  (base matmul, expand fused in its epilogue)
  backward: dh = dy·B[g]^T;  dx = dy·W[e]^T + (s·dh)·A[g]^T (fused again);  dA[g] = x^T·(s·dh);  dB[g] = h^T·dy
and W gets no gradient (it is frozen; the cotangent returned for it is zero). The per-row scale s also gets its
exact gradient (sum(dh·u)), so nothing is silently wrong if someone differentiates it.

Implementations: "reference" (today's composition of `gmm` calls; the fallback and the ground truth),
"triton" (Pallas Triton, NVIDIA GPUs), "mosaic_tpu" (Pallas Mosaic, TPUs). "pallas" means the kernel of the
current platform (on CPU: the TPU kernel under TPU interpret mode). "auto" picks the kernel on a single-device
GPU/TPU when the shapes tile and a one-time probe compiles and matches the reference, else the reference;
`JTINKER_MOE_KERNEL=reference|pallas` forces either.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.checks import first_line
from models.layers.grouped_matmul import gmm
from models.layers.quantized import QUANTIZED, NIBBLES, Fp8Weight, Int4Weight, random_fp8, random_int4, slice_groups

log = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "pallas", "triton", "mosaic_tpu")
KERNELS = ("triton", "mosaic_tpu")
ENV = "JTINKER_MOE_KERNEL"


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Row tile, and the targets for the contraction (k) and output (n) tiles; actual k/n tiles are the
    largest that divide the dimension (see `_fit`)."""
    tm: int = 128
    tk: int = 64
    tn: int = 128
    tm_t: int = 64  # rows per step in the factor-gradient (transposed) kernel
    num_warps: int = 4  # Triton only
    num_stages: int = 3  # Triton only


DEFAULT_TILES = {"triton": Tiles(128, 64, 128, 64), "mosaic_tpu": Tiles(128, 512, 256, 128)}


def reference_lora_gmm(x_MD, w_EDF, a_GDR, b_GRF, scale_M, expert_sizes_E, pair_sizes_G, gmm_impl: str = "auto",
                       first_expert=None):
    """The composition the MoE layer has always used: base gmm over experts, shrink and expand gmm over pairs."""
    out = gmm(x_MD, w_EDF, expert_sizes_E, gmm_impl, first_group=first_expert)
    shrunk_MR = (gmm(x_MD, a_GDR, pair_sizes_G, gmm_impl).astype(jnp.float32)
                 * scale_M[:, None]).astype(x_MD.dtype)
    return out + gmm(shrunk_MR, b_GRF, pair_sizes_G, gmm_impl)


# ----------------------------------------------------------------------------------------------- metadata

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


# -------------------------------------------------------------------------------------------------- tiling

def _fit(dim: int, target: int, backend: str) -> int | None:
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


def _rank_pad(R: int, backend: str) -> int:
    """Triton dots need power-of-two operands of at least 16; zero columns of A / rows of B are exact."""
    return max(16, 1 << (R - 1).bit_length()) if backend == "triton" else R


@dataclasses.dataclass(frozen=True)
class _Plan:
    backend: str
    interpret: bool
    tiles: Tiles
    num_slots: int  # X: pair groups per expert


def unsupported_reason(x_MD, w_EDF, a_GDR, b_GRF, backend: str, tiles: Tiles | None = None) -> str | None:
    """Why the kernel cannot take these operands (None if it can)."""
    tiles = tiles or DEFAULT_TILES[backend]
    E, D, F = w_EDF.shape
    G, _, R = a_GDR.shape
    if G % E:
        return f"pair groups {G} not a multiple of experts {E}"
    quantized = isinstance(w_EDF, QUANTIZED)
    if x_MD.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16) or (x_MD.dtype != w_EDF.dtype and not quantized):
        return f"dtypes x={x_MD.dtype} w={w_EDF.dtype}"
    tiled = [(_rank_pad(R, backend), tiles.tn)]
    if isinstance(w_EDF, Fp8Weight):  # every tile of W must lie in one scale block
        for transpose in (False, True):
            k_tile, n_tile = _weight_tiles(w_EDF, tiles, backend, transpose)
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
        if _fit(dim, target, backend) is None:
            return f"dimension {dim} does not tile for {backend}"
    if backend == "mosaic_tpu" and (tiles.tm % 8 or tiles.tm_t % 8):
        return "row tiles must be multiples of 8 on TPU"
    return None


# ------------------------------------------------------------------------------------------- kernel path

def _kernels(backend: str):
    if backend == "triton":
        from models.kernels import _lora_moe_triton as k
    else:
        from models.kernels import _lora_moe_tpu as k
    return k


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _pad_rows(x, rows: int):
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _weight_tiles(w, tiles: Tiles, backend: str, transpose: bool) -> tuple[int | None, int | None]:
    """The tiles of W's [K_w, N_w] sides in the matmul against it (forward: K_w is the contraction, tiled by
    tk; transposed, for dx: K_w is the output, tiled by tn). A 4-bit W's packed side K_w is tiled by its blocks
    of 8 nibble planes; an FP8 W's tiles are cut to fit its scale blocks."""
    K_w, N_w = w.shape[1], w.shape[2]
    k_target, n_target = (tiles.tn, tiles.tk) if transpose else (tiles.tk, tiles.tn)
    if isinstance(w, Fp8Weight):
        k_target, n_target = min(k_target, w.block[0]), min(n_target, w.block[1])
    k_tile = NIBBLES * w.plane if isinstance(w, Int4Weight) else _fit(K_w, k_target, backend)
    return k_tile, _fit(N_w, n_target, backend)


def _gmm_call(plan: _Plan, lhs, rhs, meta, *, transpose_rhs, out_dtype, epi=None, transpose_epi=False):
    """lhs rows of group g times rhs[g] over `meta`'s groups; `epi` = (h, factors, pair offsets) adds each row's
    slot's LoRA expand."""
    t = plan.tiles
    k_tile, n_tile = _weight_tiles(rhs, t, plan.backend, transpose_rhs)
    tiles = (t.tm, n_tile, k_tile) if transpose_rhs else (t.tm, k_tile, n_tile)
    epi_lhs, epi_rhs, epi_offsets = epi if epi is not None else (None, None, None)
    return _kernels(plan.backend).gmm(lhs, rhs, meta, transpose_rhs=transpose_rhs, num_groups=rhs.shape[0],
                                      out_dtype=out_dtype, tiles=tiles, epi_lhs=epi_lhs, epi_rhs=epi_rhs,
                                      epi_offsets=epi_offsets, transpose_epi=transpose_epi,
                                      interpret=plan.interpret, **_compiler(plan))


def _compiler(plan: _Plan) -> dict:
    t = plan.tiles
    return {"num_warps": t.num_warps, "num_stages": t.num_stages} if plan.backend == "triton" else {}


def _tgmm_call(plan: _Plan, lhs, rhs, pair_sizes, G: int):
    t = plan.tiles
    K, N, Mp = lhs.shape[1], rhs.shape[1], lhs.shape[0]
    tiles = (t.tm_t, _fit(K, t.tn, plan.backend), _fit(N, t.tn, plan.backend))
    k = _kernels(plan.backend)
    if plan.backend == "triton":
        offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(pair_sizes.astype(jnp.int32))])
        return k.tgmm(lhs, rhs, offsets, num_groups=G, tiles=tiles, interpret=plan.interpret, **_compiler(plan))
    meta = group_metadata(pair_sizes, Mp, t.tm_t, visit_empty=True)
    return k.tgmm(lhs, rhs, meta, num_groups=G, tiles=tiles, interpret=plan.interpret)


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


def _prepare(plan: _Plan, x, s, pair_sizes):
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


def _kernel_fwd(plan: _Plan, x, w, a, b, s, pair_sizes):
    dt = x.dtype
    xp, sp, groups = _prepare(plan, x, s, pair_sizes)
    u = _gmm_call(plan, xp, a.astype(dt), groups.pair_meta, transpose_rhs=False, out_dtype=jnp.float32)
    h = (u * sp.astype(jnp.float32)[:, None]).astype(dt)
    y = _gmm_call(plan, xp, w, groups.expert_meta, transpose_rhs=False, out_dtype=dt,
                  epi=(h, b.astype(dt), groups.pair_offsets))
    return y[:x.shape[0]], (xp, w, a, b, sp, u, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_lora_gmm(plan: _Plan, x, w, a, b, s, pair_sizes):
    return _kernel_fwd(plan, x, w, a, b, s, pair_sizes)[0]


def _kernel_vjp_bwd(plan, res, dy):
    xp, w, a, b, sp, u, groups = res
    M, dt, G = dy.shape[0], xp.dtype, a.shape[0]
    s32 = sp.astype(jnp.float32)[:, None]
    dyp = _pad_rows(dy.astype(dt), xp.shape[0])
    dh = _gmm_call(plan, dyp, b.astype(dt), groups.pair_meta, transpose_rhs=True, out_dtype=jnp.float32)
    ds = jnp.sum(dh * u, axis=1)[:M]
    dhs, h = (dh * s32).astype(dt), (u * s32).astype(dt)
    dx = _gmm_call(plan, dyp, w, groups.expert_meta, transpose_rhs=True, out_dtype=dt,
                   epi=(dhs, a.astype(dt), groups.pair_offsets), transpose_epi=True)[:M]
    da = _tgmm_call(plan, xp, dhs, groups.pair_sizes, G)
    db = _tgmm_call(plan, h, dyp, groups.pair_sizes, G)
    return (dx, jax.tree.map(_zero_cotangent, w), da.astype(a.dtype), db.astype(b.dtype), ds.astype(sp.dtype),
            _zero_cotangent(groups.pair_sizes))


def _zero_cotangent(t):
    return jnp.zeros_like(t) if jnp.issubdtype(t.dtype, jnp.floating) else np.zeros(t.shape, jax.dtypes.float0)


_kernel_lora_gmm.defvjp(_kernel_fwd, _kernel_vjp_bwd)


def _kernel_lora_gmm_unpadded(plan: _Plan, x, w, a, b, s, pair_sizes):
    """The custom-VJP kernel on rank-padded factors, cut back so dA/dB have the caller's shapes."""
    R = a.shape[2]
    Rp = _rank_pad(R, plan.backend)
    if Rp != R:  # pad outside the custom VJP so the padding's own VJP slices the factor gradients back
        a = jnp.pad(a, ((0, 0), (0, 0), (0, Rp - R)))
        b = jnp.pad(b, ((0, 0), (0, Rp - R), (0, 0)))
    return _kernel_lora_gmm(plan, x, w, a, b, s, pair_sizes)


# ---------------------------------------------------------------------------------------------- dispatch

def platform() -> str:
    return jax.default_backend()


def platform_kernel() -> str:
    """The kernel for this platform; on CPU the TPU kernel, which runs under TPU interpret mode."""
    return "triton" if platform() == "gpu" else "mosaic_tpu"


def resolve_impl(impl: str = "auto", operands=None, tiles: Tiles | None = None) -> str:
    """Which implementation `lora_gmm(impl=...)` runs: "reference", "triton" or "mosaic_tpu"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown LoRA-on-MoE implementation {impl!r}; expected one of {IMPLS}")
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "reference", "pallas", "auto"):
        raise ValueError(f"{ENV}={forced!r}; expected 'reference' or 'pallas'")
    if impl == "auto" and forced in ("reference", "pallas"):
        impl = forced
    if impl == "reference":
        return "reference"
    kernel = platform_kernel() if impl in ("auto", "pallas") else impl
    if operands is not None:
        reason = unsupported_reason(*operands, kernel, tiles)
        if reason is not None:
            if impl != "auto":
                log.warning("LoRA-on-MoE kernel %s cannot run (%s); using the reference", kernel, reason)
            return "reference"
    if impl == "auto":
        if platform() == "cpu" or not _single_device():
            # CPU: interpret mode is far too slow for real use. Several devices: a pallas_call cannot be
            # partitioned by XLA; it needs a shard_map around it (expert-parallel dispatch), so keep the
            # reference until then.
            return "reference"
        dtype = operands[0].dtype if operands is not None else jnp.bfloat16
        if not probe(kernel, jnp.dtype(dtype).name):
            return "reference"
    return kernel


def split_moe_impl(impl: str) -> tuple[str, str]:
    """A `RoutedExperts(impl=...)` value -> (lora_gmm impl, grouped-matmul impl). A grouped-matmul name
    ("loop", "ragged", "dense") asks for the reference composition on that gmm; a kernel name ("pallas",
    "triton", "mosaic_tpu") for that kernel; "auto" lets `resolve_impl` choose."""
    if impl in ("pallas", "triton", "mosaic_tpu", "reference"):
        return impl, "auto"
    if impl == "auto":
        return "auto", "auto"
    return "reference", impl


def _single_device() -> bool:
    return jax.device_count() == 1


def lora_gmm(x_MD, w_EDF, a_GDR, b_GRF, scale_M, expert_sizes_E, pair_sizes_G, *, impl: str = "auto",
             interpret: bool | None = None, gmm_impl: str = "auto", tiles: Tiles | None = None, first_expert=None):
    """`x·W[e] + (scale·(x·A[g])).astype(x.dtype)·B[g]` for rows sorted into pair groups g = e*X + slot.

    x [M, D]; w [E, D, F] (frozen: no gradient); a [G, D, R]; b [G, R, F] with G = E*X; scale [M] fp32;
    expert_sizes [E] (used by the reference only; equals pair_sizes summed over slots); pair_sizes [G].
    Rows past sum(pair_sizes) give zeros. `interpret` defaults to True on CPU (the only way a kernel runs
    there); `gmm_impl` is the grouped-matmul implementation of the reference path. `first_expert`: w holds
    more experts (e.g. every layer's, [L*E, D, F]) and these are w[first_expert : first_expert + E] (see `gmm`).
    """
    E = expert_sizes_E.shape[0]
    layer_w = w_EDF if first_expert is None else jax.tree.map(
        lambda t: jax.ShapeDtypeStruct((E,) + t.shape[1:], t.dtype), w_EDF)
    backend = resolve_impl(impl, (x_MD, layer_w, a_GDR, b_GRF), tiles)
    if backend == "reference":
        return reference_lora_gmm(x_MD, w_EDF, a_GDR, b_GRF, scale_M, expert_sizes_E, pair_sizes_G, gmm_impl,
                                  first_expert)
    if first_expert is not None:
        w_EDF = slice_groups(w_EDF, first_expert, E)
    if interpret is None:
        interpret = platform() == "cpu"
    plan = _Plan(backend, bool(interpret), tiles or DEFAULT_TILES[backend], a_GDR.shape[0] // w_EDF.shape[0])
    return _kernel_lora_gmm_unpadded(plan, x_MD, w_EDF, a_GDR, b_GRF, scale_M, pair_sizes_G)


# ------------------------------------------------------------------------------------------------- probe

@functools.cache
def probe(kernel: str, dtype: str = "bfloat16", interpret: bool = False) -> bool:
    """Compile and run the kernel once on a small ragged problem (forward and backward) and compare it with
    the reference; False (and a warning) on any lowering error or mismatch, so "auto" falls back instead of
    failing a training step. Cached per (kernel, dtype); safe to call while tracing."""
    try:
        # A fresh thread has no trace in progress (JAX's trace state is thread-local), so the probe really
        # compiles and runs even when called while a training step is being traced.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            err = pool.submit(_probe_error, kernel, jnp.dtype(dtype), interpret).result()
    except Exception as e:  # noqa: BLE001 - any lowering/compile/runtime failure means "don't use it"
        log.warning("LoRA-on-MoE kernel %s (%s) unavailable, using the reference: %s: %s", kernel, dtype,
                    type(e).__name__, first_line(e, "")[:300])
        return False
    tol = 3e-2 if jnp.dtype(dtype) != jnp.float32 else 1e-3
    if not err <= tol:
        log.warning("LoRA-on-MoE kernel %s (%s) disagrees with the reference (rel err %.3g); using the reference",
                    kernel, dtype, err)
        return False
    return True


def _probe_error(kernel: str, dtype, interpret: bool) -> float:
    tiles = DEFAULT_TILES[kernel]
    E, R = 4, 16  # 8 pair groups: X = 2 slots
    D, F = 2 * tiles.tk if kernel == "triton" else 256, 2 * tiles.tn if kernel == "triton" else 256
    sizes = np.array([0, 37, 1, 0, 130, 5, 60, 20], np.int32)  # E*X pair groups: empty, 1-row, mid-tile cuts
    args = random_problem(jax.random.key(0), sizes, E, D, F, R, dtype)
    return max_relative_error(args, kernel, interpret=interpret, tiles=tiles)


def random_problem(key, pair_sizes, E: int, D: int, F: int, R: int, dtype, extra_rows: int = 0,
                   int4_group: int | None = None, fp8_block: tuple[int, int] | None = None):
    """Random operands for tests, the probe and the benchmark: (x, w, a, b, scale, expert_sizes, pair_sizes);
    w is an `Int4Weight` with scale groups of `int4_group` rows, or an `Fp8Weight` with scale blocks of
    `fp8_block`, if given."""
    pair_sizes = np.asarray(pair_sizes, np.int32)
    G, M = pair_sizes.shape[0], int(pair_sizes.sum()) + extra_rows
    X = G // E
    kx, kw, ka, kb, ks = jax.random.split(key, 5)
    x = jax.random.normal(kx, (M, D), jnp.float32).astype(dtype)
    if int4_group:
        w = random_int4(kw, (E, D, F), int4_group, dtype)
    elif fp8_block:
        w = random_fp8(kw, (E, D, F), fp8_block)
    else:
        w = (jax.random.normal(kw, (E, D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    a = (jax.random.normal(ka, (G, D, R), jnp.float32) / np.sqrt(D)).astype(dtype)
    b = (jax.random.normal(kb, (G, R, F), jnp.float32) / np.sqrt(R)).astype(dtype)
    slot_rows = np.repeat(np.tile(np.arange(X), E), pair_sizes)
    scale = jnp.asarray(np.concatenate([np.where(slot_rows == 0, 0.0, 2.0 + slot_rows), np.zeros(extra_rows)]),
                        jnp.float32) * (1.0 + 0.1 * jax.random.uniform(ks, (M,)))
    expert_sizes = pair_sizes.reshape(E, X).sum(axis=1)
    return x, w, a, b, scale, jnp.asarray(expert_sizes), jnp.asarray(pair_sizes)


def value_and_grads(args, impl: str, **kwargs):
    """y and (dx, dA, dB, dscale) of sum(y * fixed cotangent), jitted: what the tests and the probe compare."""
    x, w, a, b, s, es, ps = args
    ct = jax.random.normal(jax.random.key(7), (x.shape[0], w.shape[2]), jnp.float32).astype(x.dtype)

    def loss(x, a, b, s):
        y = lora_gmm(x, w, a, b, s, es, ps, impl=impl, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, s)
    return (y,) + tuple(grads)


def fp32_operands(args):
    """The operands in fp32 for a reference: half-precision arrays widened, and quantized weights dequantized to
    the activations' dtype (as the kernel dequantizes them) and then widened."""
    x, w = args[0], args[1]
    if isinstance(w, QUANTIZED):
        w = w.dequantize(x.dtype)
    args = (x, w) + tuple(args[2:])
    return tuple(t.astype(jnp.float32) if t.dtype in (jnp.bfloat16, jnp.float16) else t for t in args)


def max_relative_error(args, kernel: str, **kwargs) -> float:
    """max over (y, dx, dA, dB, dscale) of max|kernel - reference| / max|reference| (reference computed in fp32)."""
    got = value_and_grads(args, kernel, **kwargs)
    ref = value_and_grads(fp32_operands(args), "reference")
    errs = []
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        errs.append(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))
    return float(max(errs))
