"""Expert parallelism that divides expert FLOPs: tokens travel to the shard holding their expert.

Inside a `shard_map` over the whole mesh every device holds its own tokens (sharded over the batch and length
axes) and E / EP experts (the `expert` axis), their hidden units split over `tensor`. Two dispatches:

- "all_to_all": each token-expert pair is sent to the shard that owns the expert, multiplied there with local
  weights only, and sent back. Sends go in rounds of a fixed capacity C = capacity_factor * M / EP rows per
  (sender, receiver) pair, so each shard's program multiplies EP * C = capacity_factor * M rows, a 1/EP share
  of the global work (M = local pairs). Nothing is dropped: a skewed routing just takes more rounds (all
  shards agree on the count with a `pmax`; rounds nobody needs are skipped by a `cond`).
- "gather": tokens are all-gathered over the expert axis, each shard multiplies the pairs routed to its own
  experts (work proportional to them with a dropless grouped matmul) and a reduce-scatter returns the sums.
  One collective each way regardless of skew: cheaper when top-k is large relative to EP.

The per-shard expert computation is a callable from the model (`compute(params, rows_RD, key_R) -> out_RD`,
`key = local_expert * X + adapter slot`, -1 for an empty row), so LoRA on experts works unchanged: its factors
are sharded on their expert axis like the base weights. Partial sums over `tensor` are added with one `psum`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from parallel.axes import DEFAULT_RULES
from parallel.sharding import Rules, mesh_axes_of

STRATEGIES = ("all_to_all", "gather")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """How a model's routed experts are dispatched when it runs on a mesh: `strategy` "all_to_all" (in rounds
    of `capacity_factor` x the mean load) or "gather". Part of the model, fixed when it is built."""

    strategy: str = "all_to_all"
    capacity_factor: float = 2.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown expert-parallel strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor!r}")


def _axis_arg(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _divisible_prefix(axes, size: int, mesh) -> tuple[str, ...]:
    kept, n = [], 1
    for a in axes:
        if size % (n * mesh.shape[a]) == 0:
            kept.append(a)
            n *= mesh.shape[a]
    return tuple(kept)


def capacity(local_pairs: int, ep: int, capacity_factor: float) -> int:
    """Rows per (sender, receiver) pair and round: capacity_factor * M / EP, a multiple of 8, at most M."""
    c = math.ceil(capacity_factor * local_pairs / ep)
    return max(1, min(local_pairs, -(-c // 8) * 8))


def dispatch(compute: Callable, params: Sequence, param_axes: Sequence[tuple], x_ND, experts_Nk, slot_N, *,
             num_experts: int, num_slots: int, mesh, options: ExpertParallel = ExpertParallel(),
             rules: Rules = DEFAULT_RULES, expert_mlp_divides: int | None = None):
    """Per-pair expert outputs [N, k, D] (not yet weighted), computed expert-parallel on `mesh` (a Mesh or the
    AbstractMesh of the context).

    `params` are the expert tensors (global arrays) with logical `param_axes`; only their "expert" and
    "expert_mlp" axes stay sharded inside (everything else, e.g. an FSDP-sharded width, is gathered), and the
    latter only over as many shards as divide every such extent and `expert_mlp_divides` (e.g. the blocks
    of 4-bit weights packed along it, which a shard must hold whole).
    """
    N, k = experts_Nk.shape
    ep_axes = _divisible_prefix(mesh_axes_of("expert", rules, mesh), num_experts, mesh)
    f_sizes = {p.shape[axes.index("expert_mlp")] for p, axes in zip(params, param_axes) if "expert_mlp" in axes}
    if expert_mlp_divides is not None:
        f_sizes.add(expert_mlp_divides)
    f_axes = tuple(a for a in mesh_axes_of("expert_mlp", rules, mesh) if a not in ep_axes)
    f_axes = _divisible_prefix(f_axes, math.gcd(*f_sizes) if f_sizes else 1, mesh)
    token_axes = tuple(a for a in mesh_axes_of("batch", rules, mesh) + mesh_axes_of("length", rules, mesh)
                       if a not in f_axes)
    token_axes = _divisible_prefix(token_axes, N, mesh)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    E_local = num_experts // ep
    missing = tuple(a for a in ep_axes if a not in token_axes)  # tokens replicated along these EP axes

    def spec(axes):
        return PartitionSpec(*[(_axis_arg(ep_axes) if ep_axes else None) if a == "expert" else
                               (_axis_arg(f_axes) if f_axes else None) if a == "expert_mlp" else None
                               for a in axes])

    tok = PartitionSpec(_axis_arg(token_axes) if token_axes else None)
    has_slots = slot_N is not None
    slots = slot_N if has_slots else jnp.zeros((N,), jnp.int32)

    def body(x_nD, experts_nk, slot_n, *local_params):
        n = x_nD.shape[0]
        M = n * k
        key_M = (experts_nk.reshape(-1) % E_local) * num_slots + (jnp.repeat(slot_n, k) if has_slots else 0)
        if ep == 1:
            out_MD = compute(local_params, x_nD[jnp.arange(M) // k], key_M)
        elif options.strategy == "gather":
            out_MD = _gather_dispatch(compute, local_params, x_nD, experts_nk, key_M, ep_axes, E_local)
        else:
            out_MD = _all_to_all_dispatch(compute, local_params, x_nD, experts_nk, key_M, ep_axes, E_local, ep,
                                          capacity(M, ep, options.capacity_factor), mesh.axis_names)
        if f_axes:
            out_MD = jax.lax.psum(out_MD, _axis_arg(f_axes))
        if missing:  # identical on every shard of these axes; take one copy so the output is replicated
            out_MD = jax.lax.all_gather(out_MD, _axis_arg(missing), tiled=False)[0]
        return out_MD.reshape(n, k, -1)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok) + tuple(spec(a) for a in param_axes),
                       out_specs=tok, check_vma=False)  # the grouped matmuls carry unvarying loop state
    return fn(x_ND, experts_Nk, slots, *params)


def _gather_dispatch(compute, params, x_nD, experts_nk, key_M, ep_axes, E_local):
    axis = _axis_arg(ep_axes)
    k = experts_nk.shape[1]
    xs = jax.lax.all_gather(x_nD, axis, tiled=True)  # [EP*n, D], shard order
    owner = jax.lax.all_gather(experts_nk, axis, tiled=True).reshape(-1) // E_local
    keys = jax.lax.all_gather(key_M, axis, tiled=True)
    mine = owner == jax.lax.axis_index(axis)
    out = compute(params, xs[jnp.arange(keys.shape[0]) // k], jnp.where(mine, keys, -1))
    return jax.lax.psum_scatter(out, axis, scatter_dimension=0, tiled=True)  # back to each token's shard


def _all_to_all_dispatch(compute, params, x_nD, experts_nk, key_M, ep_axes, E_local, ep, C, all_axes):
    axis = _axis_arg(ep_axes)
    n, k = experts_nk.shape
    M, D = n * k, x_nD.shape[1]
    dest_M = experts_nk.reshape(-1) // E_local
    order = jnp.argsort(dest_M, stable=True)  # pairs grouped by receiving shard
    dest = dest_M[order]
    counts = jnp.bincount(dest_M, length=ep)
    pos = jnp.arange(M) - (jnp.cumsum(counts) - counts)[dest]  # rank of the pair among those sent to `dest`
    rows_MD, keys = x_nD[order // k], key_M[order]
    # every shard runs the same number of rounds: enough for the fullest (sender, receiver) pair anywhere
    needed = jax.lax.pmax(jnp.max((counts + C - 1) // C), tuple(all_axes))

    def contribution(r):
        inside = (pos >= r * C) & (pos < (r + 1) * C)
        slot = jnp.where(inside, dest * C + pos - r * C, ep * C)  # out of range: not sent this round
        send = jnp.zeros((ep * C, D), x_nD.dtype).at[slot].set(rows_MD, mode="drop")
        send_key = jnp.full((ep * C,), -1, key_M.dtype).at[slot].set(keys, mode="drop")
        recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [EP*C, D]: C rows from each sender
        recv_key = jax.lax.all_to_all(send_key, axis, 0, 0, tiled=True)
        back = jax.lax.all_to_all(compute(params, recv, recv_key), axis, 0, 0, tiled=True)
        return jnp.where(inside[:, None], back[jnp.minimum(slot, ep * C - 1)], 0)

    def guarded(r):  # rounds nobody needs are skipped
        return jax.lax.cond(r < needed, contribution, lambda r: jnp.zeros((M, D), x_nD.dtype), r)

    # Rematerialised, with the checkpoint outside the cond: the backward pass recomputes a round instead of
    # keeping every round's buffers, and what it keeps (the weights, the rows) is loop-invariant, so the scan
    # hoists it rather than stacking a copy per round.
    guarded = jax.checkpoint(guarded, prevent_cse=False)

    def one_round(acc, r):
        return acc + guarded(r), None

    rounds = -(-M // C)
    acc, _ = jax.lax.scan(one_round, jnp.zeros((M, D), x_nD.dtype), jnp.arange(rounds))
    return jnp.zeros_like(acc).at[order].set(acc)  # back to pair order
