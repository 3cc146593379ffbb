"""Frozen expert weights kept quantized in memory and dequantized one expert or one kernel tile at a time, so a
quantized checkpoint's experts never exist in bf16: 4-bit integers with group scales (Kimi K2 Thinking's routed
experts: INT4, groups of 32; 0.56 bytes a weight, 571 GB instead of 2.03 TB for the 1T model's experts) or
float8 e4m3 with 128x128 block scales (Kimi K2 Instruct, DeepSeek-V3: 1 byte a weight, 1.01 TB).

`Fp8Weight` stands for w [..., K, N] = w8 * scale[k // bk, n // bn] (blocks (bk, bn) of [K, N]).

`Int4Weight` stands for a float matrix stack w [..., K, N] (K the contraction side, as `gmm` reads it):
  packed int32 [..., K/8, N], scale [..., K/group, N],   w[k, n] = (nibble(k, n) - 8) * scale[k // group, n].
The nibbles are "plane-packed" so a kernel unpacks them with shifts alone: K is cut into blocks of 8P rows
(P = `plane_rows(K)`: 32, or K/8 when K is not a multiple of 256) and nibble j of packed row b*P + p holds
row b*8P + j*P + p. Shifting a [P, N] tile of words by 4j thus gives the P contiguous rows j*P.. of its
block, each inside one scale group when `group % P == 0`, so a kernel dequantizes a plane with one row of
scales and feeds it straight to a matmul, with no interleaving or reshaping.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NIBBLES = 8  # 4-bit values per int32 word


def plane_rows(K: int) -> int:
    """Rows per nibble plane: 32 when K tiles by 256 (every real expert width), else K/8 (one block)."""
    if K % (NIBBLES * 32) == 0:
        return 32
    if K % NIBBLES:
        raise ValueError(f"INT4 weights need the contraction size to be a multiple of 8, got {K}")
    return K // NIBBLES


def nibble_plane(words, j: int, scale_row, dtype):
    """Plane j of a [P, n] tile of plane-packed words, dequantized with its row of scales [1, n] (kernels)."""
    q = ((words >> (4 * j)) & 0xF) - 8
    return (q.astype(jnp.float32) * scale_row.astype(jnp.float32)).astype(dtype)


class _MatrixStack:
    """Leading-axis operations of a stack of quantized matrices: the same on its values and its scales (the
    static layout fields ride along)."""

    def take(self, index):
        """The matrices at `index` of the leading axis (index may be traced)."""
        return jax.tree.map(lambda a: a[index], self)

    def slice(self, start, size: int):
        """Leading-axis entries [start, start + size) (start may be traced)."""
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), self)

    def reshape_leading(self, *leading: int):
        """Regroup the stack axes, e.g. [L, E, ...] -> [L*E, ...] (free: the matrices stay contiguous)."""
        return jax.tree.map(lambda a: a.reshape(leading + a.shape[-2:]), self)

    @property
    def dtype(self):
        return self.scale.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight(_MatrixStack):
    """A stack of frozen [K, N] matrices as plane-packed 4-bit integers and group scales (see the module).

    `plane` is fixed by the whole matrix's K when it is packed. A shard of the packed side (tensor parallel
    over K) is readable on its own only if it holds whole blocks of 8 planes, which `blocks` checks."""
    packed: jax.Array  # int32 [..., K/8, N]
    scale: jax.Array  # [..., K/group, N]; its dtype is the weight's logical dtype
    plane: int = dataclasses.field(default=0, metadata=dict(static=True))  # rows per nibble plane; 0: from K

    def __post_init__(self):
        if not self.plane:
            object.__setattr__(self, "plane", plane_rows(self.packed.shape[-2] * NIBBLES))

    @property
    def blocks(self) -> int:
        """Blocks of 8 planes along K."""
        K = self.shape[-2]
        if K % (NIBBLES * self.plane):
            raise ValueError(f"INT4 weights with K={K} do not hold whole blocks of {NIBBLES} x {self.plane} rows: "
                             "a shard of the packed side must cut between blocks")
        return K // (NIBBLES * self.plane)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.packed.shape[:-2] + (self.packed.shape[-2] * NIBBLES, self.packed.shape[-1])

    @property
    def group(self) -> int:
        return self.shape[-2] // self.scale.shape[-2]

    def dequantize(self, dtype=None) -> jax.Array:
        """The float weights [..., K, N] (meant for one matrix at a time, or for tests)."""
        K, N = self.shape[-2:]
        P = self.plane
        words = self.packed.reshape(self.packed.shape[:-2] + (self.blocks, 1, P, N))
        shifts = (4 * jnp.arange(NIBBLES, dtype=jnp.int32)).reshape(NIBBLES, 1, 1)
        q = ((words >> shifts) & 0xF) - 8  # [..., blocks, 8, P, N]
        q = q.reshape(self.packed.shape[:-2] + (K, N)).astype(jnp.float32)
        scale = jnp.repeat(self.scale.astype(jnp.float32), self.group, axis=-2)
        return (q * scale).astype(dtype or self.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight(_MatrixStack):
    """A stack of frozen [K, N] matrices as float8 e4m3 values and fp32 block scales (see the module)."""
    values: jax.Array  # float8_e4m3fn [..., K, N]
    scale: jax.Array  # fp32 [..., ceil(K/bk), ceil(N/bn)]
    block: tuple[int, int] = dataclasses.field(default=(128, 128), metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantize(self, dtype=None) -> jax.Array:
        K, N = self.shape[-2:]
        scale = jnp.repeat(jnp.repeat(self.scale.astype(jnp.float32), self.block[0], axis=-2)[..., :K, :],
                           self.block[1], axis=-1)[..., :N]
        return (self.values.astype(jnp.float32) * scale).astype(dtype or self.dtype)


QUANTIZED = (Int4Weight, Fp8Weight)


@dataclasses.dataclass(frozen=True)
class ExpertQuant:
    """How a model keeps its frozen routed experts: "int4" (scale groups of `group` rows along K) or "fp8"
    (scale blocks of `block`, given as the checkpoint's blocks over its [out, in] = [N, K] matrices), as the
    checkpoint stores them."""
    kind: str
    group: int = 32
    block: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if self.kind not in ("int4", "fp8"):
            raise ValueError(f"expert weights are kept as 'int4' or 'fp8', not {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "int4":
            return f"4-bit, groups of {self.group}"
        return f"FP8, {self.block[0]}x{self.block[1]} blocks"

    def init(self, key, shape: tuple[int, ...], dtype, std: float):
        """Random (values, scales) of a weight stack of `shape`, standard deviation about `std`."""
        if self.kind == "int4":
            return int4_init(key, shape, self.group, dtype, std)
        return fp8_init(key, shape, self.block[::-1], std)

    def weight(self, values, scale):
        """The weight the (values, scales) parameters stand for."""
        return Int4Weight(values, scale) if self.kind == "int4" else Fp8Weight(values, scale, self.block[::-1])


def matrix(w, index, dtype):
    """Matrix `index` of a weight stack, as floats of `dtype`: a plain index, or one expert dequantized."""
    return dequantized(take_layer(w, index), dtype)


def slice_groups(w, start, size: int):
    """Leading-axis rows [start, start + size) of a plain or quantized weight stack."""
    if isinstance(w, QUANTIZED):
        return w.slice(start, size)
    return jax.lax.dynamic_slice_in_dim(w, start, size)


def take_layer(w, index):
    """Entry `index` of the leading axis of a plain or quantized weight stack."""
    return w.take(index) if isinstance(w, QUANTIZED) else w[index]


def reshape_leading(w, *leading: int):
    """Regroup the leading axes of a plain or quantized weight stack (free)."""
    return w.reshape_leading(*leading) if isinstance(w, QUANTIZED) else w.reshape(leading + w.shape[-2:])


def dequantized(w, dtype=None):
    """A plain array for a plain or quantized weight (whole: for paths that cannot read it in place)."""
    return w.dequantize(dtype) if isinstance(w, QUANTIZED) else w


# ------------------------------------------------------------------------------------- host-side packing

def pack(q: np.ndarray, scale: np.ndarray, scale_dtype=jnp.bfloat16) -> Int4Weight:
    """Integers q [..., K, N] in [-8, 7] and scales [..., K/group, N] -> `Int4Weight` (numpy, on the host)."""
    q = np.asarray(q)
    K, N = q.shape[-2:]
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError("INT4 values must lie in [-8, 7]")
    if K % scale.shape[-2]:
        raise ValueError(f"{scale.shape[-2]} scale groups do not divide K={K}")
    P = plane_rows(K)
    nibbles = (q.astype(np.int64) + 8).astype(np.uint32).reshape(q.shape[:-2] + (K // (NIBBLES * P), NIBBLES, P, N))
    words = np.zeros(q.shape[:-2] + (K // (NIBBLES * P), P, N), np.uint32)
    for j in range(NIBBLES):
        words |= nibbles[..., j, :, :] << np.uint32(4 * j)
    return Int4Weight(words.view(np.int32).reshape(q.shape[:-2] + (K // NIBBLES, N)),
                      np.asarray(scale, np.float32).astype(scale_dtype), P)


def int4_init(key, shape: tuple[int, ...], group: int, dtype, std: float):
    """Random 4-bit weights (packed words, scales) of about `std`: every int32 is a valid word, and uniform
    nibbles have standard deviation sqrt((16^2 - 1) / 12) = 4.61. Traceable, for model initialisation."""
    K, N = shape[-2:]
    if K % group or K % NIBBLES:
        raise ValueError(f"INT4 experts need K={K} to be a multiple of the group size {group} and of 8")
    words = jax.random.bits(key, shape[:-2] + (K // NIBBLES, N), jnp.uint32).view(jnp.int32)
    return words, jnp.full(shape[:-2] + (K // group, N), std / 4.61, dtype)


def fp8_init(key, shape: tuple[int, ...], block: tuple[int, int], std: float):
    """Random float8 weights (values, fp32 block scales) of about `std`. Traceable, for model initialisation."""
    K, N = shape[-2:]
    values = jax.random.normal(key, shape, jnp.float32).astype(jnp.float8_e4m3fn)
    return values, jnp.full(shape[:-2] + (-(-K // block[0]), -(-N // block[1])), std, jnp.float32)


def random_fp8(key, shape: tuple[int, ...], block: tuple[int, int] = (128, 128)) -> Fp8Weight:
    """Random float8 weights [..., K, N] with varied block scales about 1/sqrt(K) (tests and benchmarks)."""
    kv, ks = jax.random.split(key)
    values, _ = fp8_init(kv, shape, block, 1.0)
    scale_shape = shape[:-2] + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    scale = jax.random.uniform(ks, scale_shape, jnp.float32, 0.5, 1.5) / np.sqrt(shape[-2])
    return Fp8Weight(values, scale, block)


def random_int4(key, shape: tuple[int, ...], group: int = 32, scale_dtype=jnp.bfloat16) -> Int4Weight:
    """Random INT4 weights [..., K, N] with scales about 1/(8 sqrt(K)) (tests and benchmarks)."""
    kq, ks = jax.random.split(key)
    K = shape[-2]
    q = np.asarray(jax.random.randint(kq, shape, -8, 8, jnp.int32))
    groups = shape[:-2] + (K // group, shape[-1])
    scale = np.asarray(jax.random.uniform(ks, groups, jnp.float32, 0.5, 1.5)) / (4 * np.sqrt(K))
    w = pack(q, scale, scale_dtype)
    return Int4Weight(jnp.asarray(w.packed), jnp.asarray(w.scale), w.plane)
