"""Lazy safetensors reading: the header is parsed by hand and tensors are numpy memmaps, so a checkpoint is
never fully in memory and bf16 / fp8 (via ml_dtypes) work without torch. Single files and sharded folders
(`model.safetensors.index.json`) look the same to callers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A malformed checkpoint: one line naming the file or tensor, what was expected and what was found."""


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise CheckpointError(f"{path.name}: header needs {header_len} bytes but the file has {size - 8} "
                                      "(truncated?)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path.name}: header is not valid JSON (corrupt file?)") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[entry["dtype"]]).itemsize
            if end - begin != expected:
                raise CheckpointError(f"{path.name}: tensor {name!r} of shape {entry['shape']} needs {expected} "
                                      f"bytes, header gives {end - begin}")
            if self.data_start + end > size:
                raise CheckpointError(f"{path.name}: tensor {name!r} needs bytes up to {self.data_start + end} "
                                      f"but the file has {size} (truncated?)")
        self._mmap = None

    def tensor(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self.data_start + begin:self.data_start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


class Checkpoint:
    """All tensors of a Hugging Face model folder: name -> (shape, lazily read array)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index.name}: expected JSON with a 'weight_map' object") from None
            files = {}
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise CheckpointError(f"{index.name}: names shard {fname!r}, which is missing from {self.dir}")
                files[fname] = SafetensorsFile(self.dir / fname)
            self._where = {}
            for name, fname in weight_map.items():
                if name not in files[fname].entries:
                    raise CheckpointError(f"{index.name}: tensor {name!r} is mapped to {fname!r}, which lacks it")
                self._where[name] = files[fname]
            for fname, sf in files.items():
                for name in sf.entries:
                    self._where.setdefault(name, sf)
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.dir}: no *.safetensors files and no model.safetensors.index.json")
            self._where = {}
            for shard in shards:
                sf = SafetensorsFile(shard)
                for name in sf.entries:
                    self._where[name] = sf

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._where[name].entries[name]["dtype"]])

    def tensor(self, name: str) -> np.ndarray:
        return self._where[name].tensor(name)
