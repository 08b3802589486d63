"""Sharded checkpoints with torch.distributed.checkpoint: atomic, verified, reshardable.

Everything is stored under logical keys that no layout changes, one per optimizer item
(`parallel/zero1/ownership.py`): `model/<name>` for a parameter (`model/<name>[e]` for expert e of a
stack, `model/<name>[rows a:b]` for a row block of a large AdamW parameter, cut by
optimizer.adamw_block_elements), `buffer/<name>` for a router bias, `optim/<state>/<key>` for the
owner's master weight and moments. Replicated values are written once (DCP deduplicates),
every rank writes only its own shards, and a rank loading under another layout simply asks for the
keys it now holds or owns, so PP2xEP2xDP2 -> one process -> PP1xEP4xDP2 is a plain load.

A checkpoint becomes visible only when complete and durable: ranks write into
`step_<N>.partial-<run>-<id>` (DCP fsyncs every file), rank 0 adds `dcp_metadata.json` (the tensor
index as JSON: parallel/checkpoint/metadata.py, so a resume never unpickles) and `k2train.json`
(step, model config, sampler position, layout, run lineage, a sha256 per file), fsyncs, renames the
directory to `step_<N>` (a re-save of a step already on disk goes to `step_<N>.r<id>`) and fsyncs
the parent, then points `latest` at it (written aside, fsynced, renamed; always one relative name
inside the directory), and only then removes what the pointer left: an older copy of the same step
and checkpoints past `keep_last`. A kill at any point leaves `latest` on a complete checkpoint.
Only the run holding the directory's lock (parallel/checkpoint/lock.py) writes, and it cleans only
its own partial directories.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from k2train.config.load import config_to_dict
from k2train.config.schema import JobConfig
from parallel.checkpoint.lineage import lineage_of, check_lineage
from parallel.checkpoint.metadata import (
    METADATA_JSON, CheckpointError, JsonWriter, checkpoint_reader, read_json_file, write_json_file,
)

# Model fields a resumed run may change: they leave every weight's shape and meaning as they were.
# The position settings are how K2 extends the context after pre-training (4k, then 32k with YaRN);
# expert_impl only picks a kernel; init_std only matters before the first step; the bias rate is a
# training rate. Every other model field changes the weights, so a checkpoint with another value is
# another model.
RESUMABLE_MODEL_FIELDS = frozenset(
    {"max_position_embeddings", "yarn", "rope_theta", "expert_impl", "init_std", "router_bias_update_rate"})
MANIFEST = "k2train.json"
LATEST = "latest"
FORMAT = 1
_COMPLETE = re.compile(r"step_(\d{8})(\.r[0-9a-f]+)?")

__all__ = ["CheckpointError", "Checkpointer", "Restored", "latest_checkpoint", "router_bias_key", "step_dir"]


def router_bias_key(layer: int) -> str:
    """The checkpoint key of MoE layer `layer`'s aux-loss-free selection bias (a buffer, not a parameter)."""
    return f"buffer/layers.{layer}.mlp.gate.e_score_correction_bias"


@dataclass(frozen=True)
class Restored:
    step: int
    sampler: dict[str, Any]
    path: Path


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The published checkpoint directories under `root`, oldest step first."""
    found = [p for p in root.glob("step_*") if _COMPLETE.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: (_step_of(p), p.name))


def _step_of(path: Path) -> int:
    return int(path.name[5:13])


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` points at, or None when the directory has no checkpoint at all."""
    pointer = root / LATEST
    if not pointer.is_file():
        steps = complete_checkpoints(root)
        if steps:
            raise CheckpointError(
                f"{root} holds {', '.join(p.name for p in steps)} but no `{LATEST}` pointer; k2train will not start "
                f"over them. Restore it (e.g. `echo {steps[-1].name} > {pointer}`) or use another checkpoint.dir.")
        return None
    name = pointer.read_text().strip()
    if not _COMPLETE.fullmatch(name):
        raise CheckpointError(f"{pointer} holds {name!r}, which is not a checkpoint name inside {root} "
                              "(step_<8 digits>); the pointer is refused.")
    path = root / name
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} points at {path}, which has no {MANIFEST}; the checkpoint is incomplete.")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_latest(root: Path, name: str) -> None:
    """Switch `latest` to `name` atomically and durably."""
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gather_objects(value: Any, distributed: bool) -> list[Any]:
    if not distributed:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _out_of_space(err: BaseException, root: Path) -> bool:
    """True when a failed save ran out of disk: ENOSPC anywhere in the chain (DCP wraps each rank's
    failure), or the torch zip writer's short-write error ("unexpected pos") on a file system left
    with under 1 MiB."""
    seen, frontier, short_write = set(), [err], False
    while frontier:
        e = frontier.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            return True
        short_write = short_write or "unexpected pos" in str(e)
        frontier += [x for x in (e.__cause__, e.__context__) if x is not None]
        for failure in getattr(e, "failures", {}).values():
            frontier += [x for x in (failure if isinstance(failure, tuple) else (failure,)) if isinstance(x, BaseException)]
    return short_write and shutil.disk_usage(root).free < (1 << 20)


class Checkpointer:
    """Saves and restores one rank's share of a run (`tensors` maps logical keys to live views).

    `run_id` names this run's partial directories (only they are cleaned) and starts a new lineage."""

    def __init__(self, cfg: JobConfig, root: Path, rank: int, distributed: bool, run_id: str | None = None):
        self.cfg, self.root, self.rank, self.distributed = cfg, root, rank, distributed
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.lineage = lineage_of(cfg, self.run_id)
        self.pending: tuple[Any, Path, dict] | None = None
        self.verified: dict[Path, dict] = {}  # checkpoints hashed once by this process

    # -- save ------------------------------------------------------------------------------------

    def save(self, step: int, tensors: dict[str, torch.Tensor], sampler: dict, layout: dict,
             planner: dcp.SavePlanner | None = None, file_per_tensor: bool = False) -> None:
        """Write the checkpoint of `step` (asynchronously with checkpoint.async_save).

        `planner` and `file_per_tensor` serve streaming conversion (`parallel/checkpoint/hf_import.py`):
        a planner that reads each tensor only when it is written, one file each, so no file
        gathers more than one tensor in memory."""
        self.wait()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        token = gather_objects(f"{self.run_id}-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None,
                                    self.distributed)[0]
        partial = self.root / f"step_{step:08d}.partial-{token}"
        manifest = dict(format=FORMAT, step=step, model=config_to_dict(self.cfg.model), sampler=sampler, layout=layout,
                        adamw_block_elements=self.cfg.optimizer.adamw_block_elements, lineage=self.lineage)
        state = {**tensors, f"rng/rank{self.rank}": torch.get_rng_state()}
        try:
            writer = JsonWriter(str(partial), single_file_per_rank=not file_per_tensor)
            if self.cfg.checkpoint.async_save:
                future = dcp.async_save(state, storage_writer=writer, planner=planner, no_dist=not self.distributed)
                self.pending = (future, partial, manifest)
            else:
                dcp.save(state, storage_writer=writer, planner=planner, no_dist=not self.distributed)
                self._publish(partial, manifest)
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            self._failed(err, partial)

    def poll(self) -> None:
        """Publish a pending asynchronous save as soon as every rank's files are written (each step)."""
        if self.pending is None:
            return
        done = all(gather_objects(self.pending[0].done(), self.distributed))
        if done:
            self.wait()

    def wait(self) -> None:
        """Finish a pending asynchronous save (called before the next save and at the end)."""
        if self.pending is not None:
            future, partial, manifest = self.pending
            self.pending = None
            try:
                future.result()
                self._publish(partial, manifest)
            except (Exception, CheckpointException) as err:
                self._failed(err, partial)

    def _failed(self, err: BaseException, partial: Path) -> None:
        """A save that failed: its partial directory goes, and running out of space is said as such."""
        full = _out_of_space(err, self.root)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            raise CheckpointError(
                f"no space left on the device holding {self.root} while writing {partial.name}; its partial "
                f"directory was removed and `{LATEST}` still names the last complete checkpoint. Free space "
                "(or lower checkpoint.keep_last) and restart.") from err
        raise err

    def _publish(self, partial: Path, manifest: dict) -> None:
        # Every rank hashes the files it wrote; rank 0 records them and makes the checkpoint visible.
        mine = {p.name: file_digest(p) for p in partial.glob(f"__{self.rank}_*.distcp")}
        digests = {}
        for part in gather_objects(mine, self.distributed):
            digests.update(part)
        if self.rank == 0:
            for name in (".metadata", METADATA_JSON):
                digests[name] = file_digest(partial / name)
            write_json_file(partial / MANIFEST, {**manifest, "files": digests})
            fsync_dir(partial)
            final = step_dir(self.root, manifest["step"])
            if final.exists():  # a re-save: the old copy stays until `latest` has moved off it
                final = final.with_name(f"{final.name}.r{partial.name.rsplit('-', 1)[1]}")
            os.replace(partial, final)
            fsync_dir(self.root)
            point_latest(self.root, final.name)
            self._retain(final)
        if self.distributed:
            dist.barrier()

    def _retain(self, newest: Path) -> None:
        """Keep the newest `keep_last` steps (one copy each: the one `latest` names for its step);
        drop this run's own partial directories of interrupted saves."""
        for path in complete_checkpoints(self.root):
            if path != newest and _step_of(path) == _step_of(newest):
                shutil.rmtree(path)
        steps = sorted({_step_of(path) for path in complete_checkpoints(self.root)})
        doomed = set(steps[: max(0, len(steps) - self.cfg.checkpoint.keep_last)])
        for path in complete_checkpoints(self.root):
            if _step_of(path) in doomed and path != newest:
                shutil.rmtree(path)
        pending = self.pending[1] if self.pending is not None else None
        self.remove_partials(self.run_id, keep=pending)

    def remove_partials(self, run_id: str, keep: Path | None = None) -> None:
        """Remove the partial directories of run `run_id` (this run's, or a provably gone owner's)."""
        for partial in self.root.glob(f"step_*.partial-{run_id}-*"):
            if partial != keep:
                shutil.rmtree(partial, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------

    def load(self, path: Path, tensors: dict[str, torch.Tensor]) -> tuple[Restored, bool]:
        """Fill `tensors` from the checkpoint at `path`. Returns what was restored and whether it
        carried optimizer state (a checkpoint converted from HF weights has none)."""
        manifest = self.verify(path)
        reader = checkpoint_reader(path, self.cfg.checkpoint.trust_pickle_metadata)
        stored = set(reader.read_metadata().state_dict_metadata)
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
        reader = checkpoint_reader(path, self.cfg.checkpoint.trust_pickle_metadata)
        dcp.load(wanted, storage_reader=reader, no_dist=not self.distributed)
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

    def verify(self, path: Path) -> dict:
        """The manifest of the checkpoint at `path`, after checking model, lineage and every file's sha256."""
        if path in self.verified:
            return self.verified[path]
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path} is missing; {path} is not a complete k2train checkpoint.")
        manifest = read_json_file(manifest_path, "the checkpoint's step, config and file digests")
        ours = config_to_dict(self.cfg.model)
        for key, value in manifest["model"].items():
            if key not in RESUMABLE_MODEL_FIELDS and ours.get(key) != value:
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
            elif file_digest(file) != manifest["files"][name]:
                problem = f"{file} does not match its sha256 in {manifest_path}; the file is corrupt."
            if problem:
                break
        problems = [p for p in gather_objects(problem, self.distributed) if p]
        if problems:
            raise CheckpointError(problems[0])
        self.verified[path] = manifest
        return manifest

    def resume_lineage(self, path: Path) -> None:
        """Continue the lineage of the checkpoint at `path`, refusing a changed config unless
        checkpoint.resume=changed."""
        self.lineage = check_lineage(self.cfg, self.verify(path).get("lineage", {}), path / MANIFEST, self.run_id)
