"""Read single tensors from a Hugging Face folder's weight files without loading the whole model.

:class:`HFTensorReader` serves one tensor at a time: safetensors by plain reads of its byte range (no
mmap, so a tensor costs exactly its own size in memory), ``.bin`` files mmapped, one file open at a
time. Sharded folders are resolved through their index (``model.safetensors.index.json`` /
``pytorch_model.bin.index.json``, via :func:`megatron_eaopd.models.hf.inspect_hf_dir`).

Source: the safetensors layout (8-byte little-endian header length, JSON header of
``{name: {dtype, shape, data_offsets}}``, then the data), https://github.com/huggingface/safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megatron_eaopd.models.hf import HFWeightFiles, inspect_hf_dir

__all__ = ["HFTensorReader"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsFile:
    """Reads single tensors from a ``.safetensors`` file with plain ``readinto`` (no mmap), so
    reading a tensor costs exactly its own size in memory (the format: 8-byte little-endian header
    length, JSON header of ``{name: {dtype, shape, data_offsets}}``, then the data)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.header = json.loads(fh.read(n))
        self.base = 8 + n
        self.header.pop("__metadata__", None)

    def keys(self):
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        h = self.header[name]
        if h["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {h['dtype']}")
        start, end = h["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb") as fh:
            fh.seek(self.base + start)
            if fh.readinto(buf) != len(buf):
                raise ValueError(f"{self.path} is truncated (tensor {name}); re-download the file")
        if not buf:
            return torch.empty(h["shape"], dtype=_ST_DTYPES[h["dtype"]])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[h["dtype"]]).reshape(h["shape"])


class HFTensorReader:
    """Lazy reader over an HF folder's weight files: tensors are read one at a time (safetensors
    without mmap; ``.bin`` mmapped, one file open at a time), so memory holds one tensor at a time.

    Args:
        files: from :func:`megatron_eaopd.models.hf.inspect_hf_dir` (or a folder path).
    Raises:
        FileNotFoundError: see ``inspect_hf_dir``.
    """

    def __init__(self, files: HFWeightFiles | str | os.PathLike):
        self.files = files if isinstance(files, HFWeightFiles) else inspect_hf_dir(files)
        self._open: dict[Path, Any] = {}
        self.where: dict[str, Path] = {k: self.files.root / v for k, v in self.files.weight_map.items()}
        if not self.where:
            for f in self.files.files:
                for k in self._handle(f).keys():
                    self.where[k] = f

    def _handle(self, f: Path):
        if f not in self._open:
            # keep one file open: mmapped pages count as resident memory until the file is closed
            self._open.clear()
            if self.files.fmt == "safetensors":
                self._open[f] = _SafetensorsFile(f)
            else:
                self._open[f] = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        return self._open[f]

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor.

        Raises:
            KeyError: the tensor is absent (a partial / truncated checkpoint) — names the folder.
        """
        if name not in self.where:
            raise KeyError(f"tensor {name!r} is missing from {self.files.root} (partial or incompatible checkpoint)")
        h = self._handle(self.where[name])
        return h.get_tensor(name) if self.files.fmt == "safetensors" else h[name]

    def close(self) -> None:
        """Drop open file handles / mmaps."""
        self._open.clear()
