"""A checkpoint directory belongs to one run lineage: its id and the config it trains with.

Every manifest records the lineage id (the run that started the directory) and the optimizer,
data and train sections it was saved under. Resuming under other values would silently chain
unrelated runs (an lr sweep over one directory resumes the previous run's step), so a resume
names what changed and continues only with checkpoint.resume=changed, which then records the new
values under the same lineage. Model changes are refused by the manifest's model check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from k2train.config.load import config_to_dict
from k2train.config.schema import JobConfig
from parallel.checkpoint.metadata import CheckpointError

# Sections that define a lineage, less keys a continued run may change: the run's length and the
# AdamW block size (checked by the checkpoint keys themselves, with its own sentence).
_SECTIONS = ("optimizer", "data", "train")
_FREE = {"train.steps", "optimizer.adamw_block_elements"}


def _tracked(cfg: JobConfig) -> dict[str, Any]:
    full = config_to_dict(cfg)
    return {f"{section}.{key}": value for section in _SECTIONS for key, value in full[section].items()
            if f"{section}.{key}" not in _FREE}


def lineage_of(cfg: JobConfig, run_id: str) -> dict[str, Any]:
    """The lineage record of a new run `run_id` under `cfg`."""
    tracked = _tracked(cfg)
    digest = hashlib.sha256(json.dumps(tracked, sort_keys=True).encode()).hexdigest()[:16]
    return dict(run_id=run_id, config_hash=digest, config=tracked)


def check_lineage(cfg: JobConfig, saved: dict[str, Any], manifest: Path, run_id: str) -> dict[str, Any]:
    """The lineage a resumed run continues; a changed config needs checkpoint.resume=changed."""
    if not saved:  # an imported checkpoint (convert --from-hf) starts the lineage of this run
        return lineage_of(cfg, run_id)
    ours = lineage_of(cfg, saved["run_id"])
    theirs = saved.get("config", {})
    changed = sorted(k for k in set(theirs) | set(ours["config"]) if theirs.get(k) != ours["config"].get(k))
    if changed and cfg.checkpoint.resume != "changed":
        shown = "; ".join(f"{k}: {theirs.get(k)!r} -> {ours['config'].get(k)!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise CheckpointError(
            f"{manifest} belongs to run {saved['run_id']}, saved under another config: {shown}{more}. Resume it "
            "under the changed config with --set checkpoint.resume=changed, or give this run its own checkpoint.dir.")
    return ours
