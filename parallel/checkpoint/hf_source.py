"""Reading a HF safetensors directory tensor by tensor, never the whole model.

The index (`model.safetensors.index.json`, or one `model.safetensors`) says which file holds each
tensor; a file is opened only to read the header of the tensors asked for (`check`) or one
tensor, or some of its rows (`read`), and closed again, so the pages of the memory map leave the
process with the tensor. Released Kimi-K2 weights are FP8 with block scales (`parallel/checkpoint/hf_fp8.py`);
they are dequantised here, on read, to the training dtype. Everything a reader can refuse is
refused by `check` before anything is written: a missing file or tensor, a truncated or corrupt
file, a shape or dtype other than expected, FP8 without its scale or with a scale of another shape.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from parallel.checkpoint.checkpointer import CheckpointError
from parallel.checkpoint.hf_fp8 import BLOCK, FP8_DTYPE, dequantize_fp8_block, scale_name, scale_shape

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PLAIN_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
FP8 = "F8_E4M3"
ACCEPTED = "bfloat16, float16, float32, or float8_e4m3fn with a float32 weight_scale_inv per 128x128 block"


class HFSource:
    """A HF safetensors directory: names from its index, tensors read one at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE).is_file():
            with self._open(SINGLE) as handle:
                self.weight_map = {name: SINGLE for name in handle.keys()}
        else:
            raise CheckpointError(f"{directory} has neither {INDEX} nor {SINGLE}.")
        self.headers: dict[str, tuple[str, tuple[int, ...]]] = {}

    def _open(self, file: str):
        path = self.directory / file
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {self.directory / INDEX} but missing.")
        try:
            return safe_open(str(path), framework="pt")
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a complete safetensors file ({err}); it is truncated or corrupt.") from None

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _where(self, name: str) -> Path:
        return self.directory / self.weight_map[name]

    def load_headers(self, names: Iterable[str]) -> None:
        """Read the dtype and shape of `names` (and their scales) from the files' headers alone."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            for wanted in (name, scale_name(name)):
                if wanted in self.weight_map and wanted not in self.headers:
                    by_file[self.weight_map[wanted]].append(wanted)
        for file, wanted in sorted(by_file.items()):
            handle = self._open(file)
            present = set(handle.keys())
            for name in wanted:
                if name not in present:
                    raise CheckpointError(f"{self.directory / INDEX} places {name} in {file}, which does not hold it.")
                piece = handle.get_slice(name)
                self.headers[name] = (piece.get_dtype(), tuple(piece.get_shape()))

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse `name` unless it is present with `shape` in a dtype this reader dequantises exactly."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory} lacks {name} (expected shape {list(shape)}).")
        self.load_headers([name])
        dtype, found = self.headers[name]
        where = self._where(name)
        if found != tuple(shape):
            raise CheckpointError(f"{name} in {where} has shape {list(found)}, but the config needs {list(shape)}.")
        if dtype in PLAIN_DTYPES:
            return
        if dtype != FP8 or len(shape) != 2:
            raise CheckpointError(f"{name} in {where} is stored as {dtype}; k2train reads {ACCEPTED}.")
        scale = scale_name(name)
        if scale not in self.headers:
            raise CheckpointError(f"{name} in {where} is float8_e4m3fn but the checkpoint has no {scale} to dequantise it.")
        scale_dtype, scale_found = self.headers[scale]
        if scale_dtype != "F32" or scale_found != scale_shape(shape):
            raise CheckpointError(f"{scale} in {self._where(scale)} is {scale_dtype} {list(scale_found)}, but "
                                  f"{name} {list(shape)} needs float32 {list(scale_shape(shape))} (one per {BLOCK}x{BLOCK} block).")

    def read(self, name: str, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (rows [a, b) of it when given) in `dtype`, dequantised if stored as FP8.
        Call `check` first: reading trusts the header it verified."""
        start, stop = rows if rows is not None else (0, self.headers[name][1][0])
        try:
            with self._open(self.weight_map[name]) as handle:
                stored = handle.get_slice(name)[start:stop] if rows is not None else handle.get_tensor(name)
                if stored.dtype != FP8_DTYPE:
                    return stored.to(dtype)
                scale = scale_name(name)
                with self._open(self.weight_map[scale]) as scales:
                    scale_inv = scales.get_slice(scale)[start // BLOCK:(stop + BLOCK - 1) // BLOCK]
                return dequantize_fp8_block(stored, scale_inv, dtype, row_start=start)
        except SafetensorError as err:
            raise CheckpointError(f"reading {name} from {self._where(name)} failed ({err}); the file is corrupt.") from None
