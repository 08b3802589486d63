"""Sharded checkpoints with torch.distributed.checkpoint: atomic, verified, reshardable.

Everything is stored under logical keys that no layout changes, one per optimizer item
(`parallel/ownership.py`): `model/<name>` for a parameter (`model/<name>[e]` for expert e of a
stack, `model/<name>[rows a:b]` for a row block of a large AdamW parameter, cut by
optimizer.adamw_block_elements), `buffer/<name>` for a router bias, `optim/<state>/<key>` for the
owner's master weight and moments. Replicated values are written once (DCP deduplicates),
every rank writes only its own shards, and a rank loading under another layout simply asks for the
keys it now holds or owns, so PP2xEP2xDP2 -> one process -> PP1xEP4xDP2 is a plain load.

A checkpoint becomes visible only when complete: ranks write into `step_<N>.partial-<id>`, rank 0
adds `k2train.json` (step, model config, sampler position, layout, a sha256 per file), renames the
directory to `step_<N>` and then points `latest` at it (written aside and renamed). A crash mid-save
leaves the previous checkpoint and `latest` untouched. Retention keeps the last `keep_last`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from k2train.config.load import config_to_dict
from k2train.config.schema import JobConfig

MANIFEST = "k2train.json"
LATEST = "latest"
FORMAT = 1


def router_bias_key(layer: int) -> str:
    """The checkpoint key of MoE layer `layer`'s aux-loss-free selection bias (a buffer, not a parameter)."""
    return f"buffer/layers.{layer}.mlp.gate.e_score_correction_bias"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or from another model; names the file."""


@dataclass(frozen=True)
class Restored:
    step: int
    sampler: dict[str, Any]
    path: Path


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` points at, or None when the directory has none yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} points at {path}, which has no {MANIFEST}; the checkpoint is incomplete.")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _all_gather_objects(value: Any, distributed: bool) -> list[Any]:
    if not distributed:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class Checkpointer:
    """Saves and restores one rank's share of a run (`tensors` maps logical keys to live views)."""

    def __init__(self, cfg: JobConfig, root: Path, rank: int, distributed: bool):
        self.cfg, self.root, self.rank, self.distributed = cfg, root, rank, distributed
        self.pending: tuple[Any, Path, dict] | None = None

    # -- save ------------------------------------------------------------------------------------

    def save(self, step: int, tensors: dict[str, torch.Tensor], sampler: dict, layout: dict,
             planner: dcp.SavePlanner | None = None, file_per_tensor: bool = False) -> None:
        """Write the checkpoint of `step` (asynchronously with checkpoint.async_save).

        `planner` and `file_per_tensor` serve streaming conversion (`parallel/convert_import.py`):
        a planner that reads each tensor only when it is written, one file each, so no file
        gathers more than one tensor in memory."""
        self.wait()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        token = _all_gather_objects(uuid.uuid4().hex[:8] if self.rank == 0 else None, self.distributed)[0]
        partial = self.root / f"step_{step:08d}.partial-{token}"
        manifest = dict(format=FORMAT, step=step, model=config_to_dict(self.cfg.model), sampler=sampler, layout=layout,
                        adamw_block_elements=self.cfg.optimizer.adamw_block_elements)
        state = {**tensors, f"rng/rank{self.rank}": torch.get_rng_state()}
        if self.cfg.checkpoint.async_save:
            self.pending = (dcp.async_save(state, checkpoint_id=str(partial), no_dist=not self.distributed),
                            partial, manifest)
        else:
            writer = dcp.FileSystemWriter(str(partial), single_file_per_rank=not file_per_tensor)
            dcp.save(state, checkpoint_id=str(partial), storage_writer=writer, planner=planner,
                     no_dist=not self.distributed)
            self._publish(partial, manifest)

    def wait(self) -> None:
        """Finish a pending asynchronous save (called before the next save and at the end)."""
        if self.pending is not None:
            future, partial, manifest = self.pending
            self.pending = None
            future.result()
            self._publish(partial, manifest)

    def _publish(self, partial: Path, manifest: dict) -> None:
        # Every rank hashes the files it wrote; rank 0 records them and makes the checkpoint visible.
        mine = {p.name: _file_digest(p) for p in partial.glob(f"__{self.rank}_*.distcp")}
        digests = {}
        for part in _all_gather_objects(mine, self.distributed):
            digests.update(part)
        if self.rank == 0:
            digests[".metadata"] = _file_digest(partial / ".metadata")
            (partial / MANIFEST).write_text(json.dumps({**manifest, "files": digests}, indent=1))
            final = step_dir(self.root, manifest["step"])
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            pointer = self.root / f"{LATEST}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / LATEST)
            self._retain()
        if self.distributed:
            dist.barrier()

    def _retain(self) -> None:
        """Keep the newest `keep_last` checkpoints; drop partial directories of interrupted saves."""
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir() and ".partial-" not in p.name)
        for old in steps[: max(0, len(steps) - self.cfg.checkpoint.keep_last)]:
            shutil.rmtree(old)
        for partial in self.root.glob("step_*.partial-*"):
            if self.pending is None:
                shutil.rmtree(partial, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------

    def load(self, path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Restored, bool]:
        """Fill `tensors` from the checkpoint at `path`. Returns what was restored and whether it
        carried optimizer state (a checkpoint converted from HF weights has none)."""
        manifest = self._verify(path)
        stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        missing = sorted(k for k in tensors if k.startswith(("model/", "buffer/")) and k not in stored)
        if missing:
            raise CheckpointError(f"{path} has no {missing[0]} (and {len(missing) - 1} more keys this rank needs)"
                                  f"{self._blocks_note(manifest)}.")
        with_optimizer = any(k.startswith("optim/") for k in stored)
        wanted = {k: v for k, v in tensors.items() if k in stored}
        rng_key = f"rng/rank{self.rank}"
        same_layout = manifest.get("layout", {}).get("world_size") == (dist.get_world_size() if self.distributed else 1)
        if same_layout and rng_key in stored:
            wanted[rng_key] = torch.get_rng_state()
        dcp.load(wanted, checkpoint_id=str(path), no_dist=not self.distributed)
        if rng_key in wanted:
            torch.set_rng_state(wanted[rng_key])
        return Restored(manifest["step"], manifest.get("sampler", {}), path), with_optimizer

    def _blocks_note(self, manifest: dict) -> str:
        """Why keys can be missing across runs of one model: another AdamW row-block size."""
        saved, ours = manifest.get("adamw_block_elements"), self.cfg.optimizer.adamw_block_elements
        if saved is None or saved == ours:
            return ""
        return (f"; it was saved with optimizer.adamw_block_elements={saved}, but this run has {ours}, "
                "which cuts the AdamW parameters into other row blocks")

    def _verify(self, path: Path) -> dict:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path} is missing; {path} is not a complete k2train checkpoint.")
        manifest = json.loads(manifest_path.read_text())
        ours = config_to_dict(self.cfg.model)
        for key, value in manifest["model"].items():
            if ours.get(key) != value:
                raise CheckpointError(
                    f"{manifest_path} was saved for model.{key}={value!r}, but this run has model.{key}={ours.get(key)!r}."
                )
        # Ranks check the files round-robin, then agree.
        names = sorted(manifest["files"])
        world = dist.get_world_size() if self.distributed else 1
        problem = ""
        for name in names[self.rank::world]:
            file = path / name
            if not file.is_file():
                problem = f"{file} is missing from the checkpoint."
            elif _file_digest(file) != manifest["files"][name]:
                problem = f"{file} does not match its sha256 in {manifest_path}; the file is corrupt."
            if problem:
                break
        problems = [p for p in _all_gather_objects(problem, self.distributed) if p]
        if problems:
            raise CheckpointError(problems[0])
        return manifest
