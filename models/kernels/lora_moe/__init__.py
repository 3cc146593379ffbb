"""LoRA on routed experts: `y = x·W[e] + s·(x·A[j])·B[j]` over rows sorted into (expert, adapter-slot) pair groups
j = e*X + slot, forward and backward, as Pallas kernels or as the composition of grouped matmuls they replace.

Laid out the megablox way: the kernels themselves (`triton.py` for NVIDIA GPUs, `mosaic_tpu.py` for TPUs), their
custom VJP (`ops.py`), what both share (`common.py`: tiles, work lists, the operand check), and the dispatch here.

Rows are sorted expert-major, slot-minor (as `RoutedExperts` does), so pair group j refines expert group
e = j // X. The big matmuls (against W) run over expert groups: a row tile is computed once per expert it
holds, and the adapter slots inside it are masked apart only in the LoRA epilogue. (Over pair groups, a tile
cut by slot boundaries would repeat its whole base matmul per slot: 2.75x the tiles at Qwen3-30B-A3B's routing
with 4 slots and 128-row tiles, against 1.46x over expert groups.) The rank-R matmuls run over pair groups.

Which implementation runs is the caller's decision, made once when the model is built
(`models.layers.moe_impl`); nothing here reads the environment or probes the device.

Letters: M routed rows, D in, F out, E experts, X adapter slots, J = E*X pair groups, R rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.kernels.lora_moe.common import DEFAULT_TILES, Tiles, unsupported_reason
from models.kernels.lora_moe.ops import Plan, kernel_lora_gmm
from models.layers.grouped_matmul import gmm
from models.layers.quantized import slice_groups

KERNELS = ("triton", "mosaic_tpu")
IMPLS = ("reference",) + KERNELS

__all__ = ["DEFAULT_TILES", "IMPLS", "KERNELS", "Tiles", "lora_gmm", "reference_lora_gmm", "unsupported_reason"]


def reference_lora_gmm(x_MD, w_EDF, a_JDR, b_JRF, scale_M, expert_sizes_E, pair_sizes_J, gmm_impl: str = "auto",
                       first_expert=None):
    """The composition the kernels replace: base gmm over experts, shrink and expand gmm over pairs."""
    out = gmm(x_MD, w_EDF, expert_sizes_E, gmm_impl, first_group=first_expert)
    shrunk_MR = (gmm(x_MD, a_JDR, pair_sizes_J, gmm_impl).astype(jnp.float32)
                 * scale_M[:, None]).astype(x_MD.dtype)
    return out + gmm(shrunk_MR, b_JRF, pair_sizes_J, gmm_impl)


def lora_gmm(x_MD, w_EDF, a_JDR, b_JRF, scale_M, expert_sizes_E, pair_sizes_J, *, impl: str,
             interpret: bool | None = None, gmm_impl: str = "auto", tiles: Tiles | None = None, first_expert=None):
    """`x·W[e] + (scale·(x·A[j])).astype(x.dtype)·B[j]` for rows sorted into pair groups j = e*X + slot.

    x [M, D]; w [E, D, F] (frozen: no gradient); a [J, D, R]; b [J, R, F] with J = E*X; scale [M] fp32;
    expert_sizes [E] (used by the reference only; equals pair_sizes summed over slots); pair_sizes [J].
    Rows past sum(pair_sizes) give zeros. `impl`: "reference" (`gmm_impl` is its grouped matmul), "triton" or
    "mosaic_tpu"; a kernel asked for operands it cannot take is a ValueError naming why. `interpret` defaults
    to True on CPU (the only way a kernel runs there). `first_expert`: w holds more experts (e.g. every
    layer's, [L*E, D, F]) and these are w[first_expert : first_expert + E] (see `gmm`).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown LoRA-on-MoE implementation {impl!r}; expected one of {IMPLS}")
    if impl == "reference":
        return reference_lora_gmm(x_MD, w_EDF, a_JDR, b_JRF, scale_M, expert_sizes_E, pair_sizes_J, gmm_impl,
                                  first_expert)
    E = expert_sizes_E.shape[0]
    if first_expert is not None:
        w_EDF = slice_groups(w_EDF, first_expert, E)
    reason = unsupported_reason(x_MD, w_EDF, a_JDR, b_JRF, impl, tiles)
    if reason is not None:
        raise ValueError(f"LoRA-on-MoE kernel {impl} cannot take x {tuple(x_MD.shape)}, w {tuple(w_EDF.shape)}, "
                         f"a {tuple(a_JDR.shape)}: {reason}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    plan = Plan(impl, bool(interpret), tiles or DEFAULT_TILES[impl], a_JDR.shape[0] // E)
    return kernel_lora_gmm(plan, x_MD, w_EDF, a_JDR, b_JRF, scale_M, pair_sizes_J)
