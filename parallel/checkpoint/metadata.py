"""DCP metadata as plain JSON, so loading a checkpoint never unpickles anything it holds.

torch.distributed.checkpoint keeps its index (which key lives in which file, at which offset) in a
pickled `.metadata`, and unpickling runs whatever code the file names: whoever can write a
checkpoint could run commands on every resume. `JsonWriter` writes the same index as
`dcp_metadata.json` beside it; `JsonReader` feeds DCP's planner from that file only, and accepts
nothing but tensors (DCP reads a tensor payload with `torch.load(weights_only=True)`; its byte
entries would be unpickled, so the JSON has no way to express one) stored in this directory's
`__<rank>_<n>.distcp` files without storage transforms. The pickled `.metadata` is still written
for torch's own tools and is never read by k2train, except through `PickleReader` when a user
passes `--trust-checkpoint` for a checkpoint that has no JSON index.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata,
)

METADATA_JSON = "dcp_metadata.json"
JSON_FORMAT = "k2train-dcp-metadata/1"
_PAYLOAD = re.compile(r"__\d+_\d+\.distcp")
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or from another model; names the file."""


class UnsafeMetadataError(CheckpointError):
    """A checkpoint's index that k2train will not read (missing JSON, or JSON outside the format)."""


def write_json_file(path: Path, value: Any) -> None:
    """Write JSON durably: aside, fsynced, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file k2train wrote; anything else is one sentence naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnsafeMetadataError(f"{path} is not valid JSON ({err}); it should hold {what}.") from None


def metadata_to_json(metadata: Metadata) -> dict:
    tensors, storage = {}, []
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"checkpoint key {fqn} is not a tensor; k2train checkpoints hold tensors only.")
        tensors[fqn] = dict(dtype=str(md.properties.dtype).removeprefix("torch."), size=list(md.size),
                            chunks=[dict(offsets=list(c.offsets), sizes=list(c.sizes)) for c in md.chunks])
    for index, info in metadata.storage_data.items():
        storage.append(dict(fqn=index.fqn, offset=None if index.offset is None else list(index.offset),
                            index=index.index, file=info.relative_path, at=info.offset, length=info.length))
    mappings = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    return dict(format=JSON_FORMAT, tensors=tensors, storage=storage, planner_data=mappings)


def metadata_from_json(doc: Any, path: Path) -> Metadata:
    """The DCP index described by `doc`, refusing anything but tensors in this directory's payload files."""
    def bad(why: str) -> UnsafeMetadataError:
        return UnsafeMetadataError(f"{path} is not a k2train DCP index ({why}); the checkpoint is refused.")

    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise bad(f"format is not {JSON_FORMAT!r}")
    try:
        state = {}
        for fqn, t in doc["tensors"].items():
            if t["dtype"] not in _DTYPES:
                raise bad(f"{fqn} has dtype {t['dtype']!r}")
            chunks = [ChunkStorageMetadata(torch.Size(_ints(c["offsets"])), torch.Size(_ints(c["sizes"])))
                      for c in t["chunks"]]
            state[fqn] = TensorStorageMetadata(TensorProperties(dtype=_DTYPES[t["dtype"]]),
                                               torch.Size(_ints(t["size"])), chunks)
        storage = {}
        for s in doc["storage"]:
            if not isinstance(s["file"], str) or not _PAYLOAD.fullmatch(s["file"]):
                raise bad(f"{s['fqn']} is stored in {s['file']!r}, not a __<rank>_<n>.distcp file")
            if s["fqn"] not in state:
                raise bad(f"storage entry {s['fqn']} is not a tensor of the index")
            offset = None if s["offset"] is None else torch.Size(_ints(s["offset"]))
            index = MetadataIndex(s["fqn"], offset, None if s["index"] is None else int(s["index"]))
            storage[index] = _StorageInfo(s["file"], *_ints([s["at"], s["length"]]))
        mappings = {str(k): tuple(str(x) for x in v) for k, v in doc["planner_data"].items()}
    except (KeyError, TypeError, AttributeError) as err:
        raise bad(f"malformed entry: {err!r}") from None
    return Metadata(state_dict_metadata=state, planner_data=mappings, storage_data=storage,
                    storage_meta=StorageMeta())


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        raise TypeError(f"expected a list of non-negative integers, got {values!r}")
    return values


class JsonWriter(FileSystemWriter):
    """DCP's file writer (files fsynced) that also writes the index as `dcp_metadata.json`."""

    def finish(self, metadata: Metadata, results: list) -> None:
        super().finish(metadata, results)
        write_json_file(Path(self.path) / METADATA_JSON, metadata_to_json(metadata))


class JsonReader(FileSystemReader):
    """DCP's file reader with the index read from `dcp_metadata.json`: nothing is unpickled."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_JSON
        if not path.is_file():
            raise UnsafeMetadataError(
                f"{path} is missing, so the checkpoint's index exists only as the pickle {Path(self.path) / '.metadata'}, "
                "which can run code when read; k2train refuses it (pass --trust-checkpoint if you wrote this "
                "checkpoint yourself).")
        metadata = metadata_from_json(read_json_file(path, "the checkpoint's tensor index"), path)
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoint_reader(path: Path, trust: bool) -> FileSystemReader:
    """The reader of the checkpoint at `path`: JSON index only, or DCP's pickle when trusted and no JSON exists."""
    if trust and not (path / METADATA_JSON).is_file():
        return FileSystemReader(str(path))
    return JsonReader(str(path))
