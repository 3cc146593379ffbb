"""Quantized checkpoint formats, dequantized on load.

- FP8 (DeepSeek-V3, Kimi K2): `X.weight` float8_e4m3fn [out, in] with `X.weight_scale_inv` fp32
  [ceil(out/b0), ceil(in/b1)] (blocks of `weight_block_size`, 128x128): W = W8 * s[i // b0, j // b1].
- INT4, compressed-tensors `pack-quantized` (Kimi K2 Thinking's routed experts): `X.weight_packed` int32
  [out, ceil(in/8)] holding eight 4-bit values per word (nibble j of word k is column 8k+j, little-endian,
  value q = nibble - 8), `X.weight_scale` [out, ceil(in/g)] (groups of g = 32 columns, symmetric) and
  `X.weight_shape` [2]: W = q * scale[:, j // g].

`QuantizedView` wraps a `Checkpoint` so that the loader sees plain `X.weight` tensors, dequantized to the model
dtype when read. Routed experts can instead stay quantized in memory (`quantized_parts`, the loader's default;
see `models/layers/quantized.py`).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from models.layers.quantized import Int4Weight, pack
from models.safetensors_io import Checkpoint, CheckpointError

FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def _group_size(quantization_config: dict | None) -> int:
    for group in ((quantization_config or {}).get("config_groups") or {}).values():
        size = (group.get("weights") or {}).get("group_size")
        if size:
            return int(size)
    return 32


def _block_size(quantization_config: dict | None) -> tuple[int, int]:
    block = (quantization_config or {}).get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    rows = np.repeat(scale_inv.astype(np.float32), block[0], axis=0)[:weight.shape[0]]
    scale = np.repeat(rows, block[1], axis=1)[:, :weight.shape[1]]
    return weight.astype(np.float32) * scale


def unpack_int4(packed: np.ndarray, columns: int) -> np.ndarray:
    """int32 [out, ceil(in/8)] -> int8 values in [-8, 7], [out, in]."""
    words = packed.astype(np.uint32)
    nibbles = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF  # [out, words, 8]
    return (nibbles.reshape(packed.shape[0], -1)[:, :columns].astype(np.int8) - 8)


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, columns: int, group: int) -> np.ndarray:
    q = unpack_int4(packed, columns).astype(np.float32)
    return q * np.repeat(scale.astype(np.float32), group, axis=1)[:, :columns]


def int4_for_gmm(packed_out_in: np.ndarray, scale_out_groups: np.ndarray, in_features: int,
                 scale_dtype) -> Int4Weight:
    """One checkpoint matrix in compressed-tensors `pack-quantized` layout (int32 [out, in/8], scales
    [out, in/group]) -> the in-memory `Int4Weight` [in, out] that `gmm` reads, re-packed in nibble planes
    without ever becoming floats."""
    q = unpack_int4(np.asarray(packed_out_in), in_features)  # [out, in]
    return pack(q.T, np.asarray(scale_out_groups).T, scale_dtype)


class QuantizedView:
    """The tensors of a checkpoint with quantized weights presented as plain `X.weight` (same interface as
    `Checkpoint`). Layout problems are found up front; scale values are checked when a tensor is read."""

    def __init__(self, ckpt: Checkpoint, quantization_config: dict | None):
        self.ckpt, self.dir = ckpt, ckpt.dir
        self.block, self.group = _block_size(quantization_config), _group_size(quantization_config)
        self._logical: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (format, shape)
        hidden = set()
        names = set(ckpt.names())
        for name in sorted(names):
            if name.endswith(".weight_packed"):
                base = name[: -len("_packed")]
                shape = self._check_int4(base, names)
                self._logical[base] = ("int4", shape)
                hidden.update({name, f"{base}_scale", f"{base}_shape"})
            elif name.endswith(".weight") and self.ckpt.dtype(name) in FP8_DTYPES:
                self._check_fp8(name, names)
                self._logical[name] = ("fp8", ckpt.shape(name))
                hidden.add(f"{name}_scale_inv")
        stray = sorted(n for n in names if n.endswith("_scale_inv") and n not in hidden)
        if stray:
            raise CheckpointError(f"tensor {stray[0]!r}: a block scale for {stray[0][:-len('_scale_inv')]!r}, "
                                  "which is not float8")
        self._plain = sorted(n for n in names if n not in hidden and n not in self._logical)

    def _check_fp8(self, name: str, names: set[str]) -> None:
        scale_name = f"{name}_scale_inv"
        if scale_name not in names:
            raise CheckpointError(f"tensor {name!r} is float8 but the checkpoint has no {scale_name!r}")
        out, inp = self.ckpt.shape(name)
        expected = (math.ceil(out / self.block[0]), math.ceil(inp / self.block[1]))
        if self.ckpt.shape(scale_name) != expected:
            raise CheckpointError(f"tensor {scale_name!r}: expected shape {list(expected)} (blocks of "
                                  f"{list(self.block)} over {[out, inp]}), found {list(self.ckpt.shape(scale_name))}")

    def _check_int4(self, base: str, names: set[str]) -> tuple[int, int]:
        packed, scale, shape_name = f"{base}_packed", f"{base}_scale", f"{base}_shape"
        for needed in (scale, shape_name):
            if needed not in names:
                raise CheckpointError(f"tensor {packed!r} has no {needed!r} (compressed-tensors pack-quantized)")
        if self.ckpt.dtype(packed) != np.int32:
            raise CheckpointError(f"tensor {packed!r}: expected dtype int32, found {self.ckpt.dtype(packed)}")
        out, inp = (int(v) for v in np.asarray(self.ckpt.tensor(shape_name)).reshape(-1)[:2])
        checks = ((packed, (out, math.ceil(inp / 8))), (scale, (out, math.ceil(inp / self.group))))
        for name, expected in checks:
            if self.ckpt.shape(name) != expected:
                raise CheckpointError(f"tensor {name!r}: expected shape {list(expected)} for a [{out}, {inp}] weight "
                                      f"(from {shape_name!r}), found {list(self.ckpt.shape(name))}")
        return out, inp

    def names(self) -> list[str]:
        return sorted(self._plain + list(self._logical))

    def quantized_names(self) -> list[str]:
        return sorted(self._logical)

    def __contains__(self, name: str) -> bool:
        return name in self._logical or name in self._plain

    def shape(self, name: str) -> tuple[int, ...]:
        return self._logical[name][1] if name in self._logical else self.ckpt.shape(name)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._logical:
            return self.ckpt.tensor(name)
        fmt, shape = self._logical[name]
        if fmt == "fp8":
            scale_name = f"{name}_scale_inv"
            scale = np.asarray(self.ckpt.tensor(scale_name), np.float32)
            self._check_scale(scale_name, scale)
            return dequantize_fp8(np.asarray(self.ckpt.tensor(name)), scale, self.block)
        scale_name = f"{name}_scale"
        scale = np.asarray(self.ckpt.tensor(scale_name), np.float32)
        self._check_scale(scale_name, scale)
        return dequantize_int4(np.asarray(self.ckpt.tensor(f"{name}_packed")), scale, shape[1], self.group)

    def quantized_parts(self, name: str, fmt: str) -> tuple[np.ndarray, np.ndarray]:
        """The raw parts of a quantized `X.weight` for a model that keeps it quantized: `fmt` "int4" gives
        (packed int32 [out, in/8], scales [out, in/group]), "fp8" (float8 values [out, in], fp32 block scales)."""
        found = self._logical.get(name, (None,))[0]
        if found != fmt:
            raise CheckpointError(f"tensor {name!r}: the model keeps routed experts as {fmt} (the config's "
                                  f"quantization_config), but the checkpoint stores it as "
                                  f"{found or self.ckpt.dtype(name)}")
        scale_name = f"{name}_scale" if fmt == "int4" else f"{name}_scale_inv"
        scale = np.asarray(self.ckpt.tensor(scale_name))
        self._check_scale(scale_name, scale.astype(np.float32))
        return np.asarray(self.ckpt.tensor(f"{name}_packed" if fmt == "int4" else name)), scale

    @staticmethod
    def _check_scale(name: str, scale: np.ndarray) -> None:
        bad = ~np.isfinite(scale) | (scale < 0)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise CheckpointError(f"tensor {name!r}: scales must be finite and non-negative, found "
                                  f"{scale[index]!r} at {list(index)} ({int(bad.sum())} bad values)")


def open_checkpoint(model_dir, quantization_config: dict | None = None) -> QuantizedView:
    """The checkpoint of a folder, with any quantized weights dequantized when read."""
    return QuantizedView(Checkpoint(model_dir), quantization_config)
