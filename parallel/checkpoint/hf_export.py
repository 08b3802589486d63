"""A checkpoint -> HF safetensors (DeepseekV3 layout, bf16 or the checkpoint's dtype), streamed.

The HF tensors, their shapes and dtypes come from the checkpoint's index alone, read as JSON
(`parallel/checkpoint/metadata.py`; the pickled `.metadata` only with --trust-checkpoint). Shards are
planned up front (`shard_bytes` each), so a shard's safetensors header is written first and its
tensors follow as they are read from the checkpoint, at most `working_set_bytes` of them per DCP
load (one checkpoint tensor when larger): memory does not grow with the model. Experts are one
checkpoint key each; the embedding and head are their row-block keys, written in row order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from k2train.config.load import config_to_dict
from k2train.config.schema import JobConfig
from k2train.model.hf_names import hf_config_dict, hf_name_of_item, to_hf_name
from parallel.checkpoint.checkpointer import MANIFEST, CheckpointError, Checkpointer, latest_checkpoint
from parallel.checkpoint.metadata import checkpoint_reader

INDEX = "model.safetensors.index.json"
# A resumed run may change these (parallel/checkpoint.RESUMABLE_MODEL_FIELDS: K2's long-context
# stage); config.json carries them, so an export must write the checkpoint's own.
POSITION_FIELDS = ("rope_theta", "yarn")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass
class HFTensor:
    """One tensor of the HF checkpoint and the checkpoint keys that hold it, in row order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    keys: list[tuple[str, tuple[int, ...]]]  # (checkpoint key, its shape)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def hf_tensors(path: Path, trust: bool = False) -> list[HFTensor]:
    """The HF tensors of the checkpoint at `path`, from its DCP index (no tensor is read)."""
    stored = checkpoint_reader(path, trust).read_metadata().state_dict_metadata
    tensors: dict[str, HFTensor] = {}
    for key, meta in stored.items():
        if key.startswith("model/"):
            name, rows = hf_name_of_item(key.removeprefix("model/"))
        elif key.startswith("buffer/"):
            name, rows = to_hf_name(key.removeprefix("buffer/")), None
        else:
            continue
        shape = tuple(meta.size)
        entry = tensors.setdefault(name, HFTensor(name, shape, meta.properties.dtype, []))
        entry.keys.append((key, shape))
        if rows is not None:
            entry.keys.sort(key=lambda k: int(k[0].rsplit("[rows ", 1)[1].split(":")[0]))
            entry.shape = (sum(s[0] for _, s in entry.keys), *shape[1:])
    return [tensors[name] for name in sorted(tensors, key=_layer_order)]


def _layer_order(name: str) -> tuple:
    """Embedding, layers in order (experts by index), final norm, head: the order readers expect."""
    parts = name.split(".")
    layer = int(parts[2]) if parts[1:2] == ["layers"] else (-1 if "embed" in name else 1 << 30)
    expert = int(parts[5]) if len(parts) > 5 and parts[4] == "experts" else -1
    return layer, expert, name


def plan_shards(tensors: list[HFTensor], shard_bytes: int) -> list[list[HFTensor]]:
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(shard: list[HFTensor]) -> bytes:
    """A safetensors header: each tensor's dtype, shape and byte range, padded to 8 bytes."""
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        entries[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_shard(path: Path, shard: list[HFTensor], checkpoint: Path, working_set_bytes: int, trust: bool) -> None:
    keys = [(key, shape, t.dtype) for t in shard for key, shape in t.keys]
    with path.open("wb") as f:
        f.write(_header(shard))
        start = 0
        while start < len(keys):
            batch, size = [], 0
            for key, shape, dtype in keys[start:]:
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                if batch and size + nbytes > working_set_bytes:
                    break
                batch.append((key, torch.empty(shape, dtype=dtype)))
                size += nbytes
            dcp.load(dict(batch), storage_reader=checkpoint_reader(checkpoint, trust), no_dist=True)
            for _, tensor in batch:
                f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
            start += len(batch)


def export_hf(cfg: JobConfig, checkpoint: Path, out: Path, shard_bytes: int = 4 << 30,
              working_set_bytes: int = 256 << 20) -> list[Path]:
    """Write the model of a checkpoint (a step directory or a root with `latest`) as sharded HF
    safetensors with an index and a DeepseekV3 config.json; returns the shard files."""
    path = checkpoint if (checkpoint / MANIFEST).is_file() else latest_checkpoint(checkpoint)
    if path is None:
        raise CheckpointError(f"{checkpoint} holds no checkpoint ({MANIFEST} or a `latest` pointer).")
    # Every file's sha256 and the model config the checkpoint was saved with, before anything is read.
    manifest = Checkpointer(cfg, path.parent, rank=0, distributed=False).verify(path)
    ours = config_to_dict(cfg.model)
    for key in POSITION_FIELDS:
        if manifest["model"].get(key) != ours[key]:
            raise CheckpointError(
                f"{path / MANIFEST} was saved with model.{key}={manifest['model'].get(key)!r}, but the config has "
                f"model.{key}={ours[key]!r}; config.json would describe another model, so set the checkpoint's value.")
    trust = cfg.checkpoint.trust_pickle_metadata
    tensors = hf_tensors(path, trust)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(tensors, shard_bytes)
    files, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(file, shard, path, working_set_bytes, trust)
        files.append(file)
        weight_map.update({t.name: file.name for t in shard})
    total = sum(t.nbytes for t in tensors)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = hf_config_dict(cfg.model)
    config["torch_dtype"] = str(tensors[0].dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return files
