"""This project's checkpoints <-> HF safetensors in the DeepseekV3 layout of Kimi-K2.

Both directions stream, tensor by tensor, so memory does not grow with the model (a 1T model
converts on ordinary hosts). Export (`parallel/checkpoint/hf_export.py`) reads the model tensors of a
checkpoint (any layout: the keys are logical) and writes sharded `model-0000i-of-0000N.safetensors`
files, `model.safetensors.index.json` and a DeepseekV3 `config.json` that
`transformers.DeepseekV3ForCausalLM.from_pretrained` loads. Import (`parallel/checkpoint/hf_import.py`)
reads safetensors (never a pickle; bf16/fp16/fp32, or the released FP8 block weights with their
scales) and writes a step-0 checkpoint holding the model only: a run resumed from it starts the
optimizer fresh from those weights. Under torchrun or Slurm every rank imports the keys it owns
under the config's layout. The HF config.json is compared field by field first
(`parallel/checkpoint/hf_config.py`). Names are mapped by `k2train.model.hf_names`. The `k2train convert`
command (launch/convert_cli.py) runs both directions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from k2train.config.schema import JobConfig
from k2train.model import K2Model
from parallel.checkpoint.checkpointer import MANIFEST, CheckpointError, Checkpointer, latest_checkpoint, router_bias_key
from parallel.checkpoint.hf_export import export_hf
from parallel.checkpoint.hf_import import import_hf
from parallel.zero1.ownership import item_places
from parallel.state import LaunchEnv, init_parallel
from parallel.layout import layout_for

# Both directions in one place: the export is hf_export's, named here beside the import.
__all__ = ["export_hf", "import_checkpoint", "import_hf", "load_whole_model", "model_views"]


def model_views(model: K2Model, block_elements: int) -> dict[str, torch.Tensor]:
    """The checkpoint keys of a whole model, one per optimizer item as the trainer saves them
    (`parallel/zero1/ownership.py`): model/<name>, model/<name>[e] per expert, model/<name>[rows a:b] per
    row block of a large AdamW parameter (optimizer.adamw_block_elements); and buffer/<bias>."""
    named = list(model.named_parameters())
    views = {}
    for place in item_places(named, 0, block_elements):
        data = named[place.position][1].data
        views[f"model/{place.item.key}"] = data if place.part is None else data[place.part]
    for layer, bias in zip(model.moe_layers(), model.router_biases(), strict=True):
        views[router_bias_key(layer)] = bias
    return views


def load_whole_model(cfg: JobConfig, checkpoint: Path) -> K2Model:
    """One process holding the whole model, read from a checkpoint directory or a checkpoint root."""
    path = checkpoint if (checkpoint / MANIFEST).is_file() else latest_checkpoint(checkpoint)
    if path is None:
        raise CheckpointError(f"{checkpoint} holds no checkpoint ({MANIFEST} or a `latest` pointer).")
    model = K2Model(cfg.model, seed=cfg.train.seed).to(getattr(torch, cfg.train.param_dtype))
    views = model_views(model, cfg.optimizer.adamw_block_elements)
    Checkpointer(cfg, path.parent, rank=0, distributed=False).load(path, views)
    return model


def import_checkpoint(cfg: JobConfig, hf_dir: Path, out: Path, env: LaunchEnv,
                      accepted: tuple[str, ...] = ()) -> Path | None:
    """HF safetensors in `hf_dir` as a step-0 checkpoint under `out`, written by one process or by
    every rank of the launched world `env`, each the keys it owns under the config's layout
    (parallel/checkpoint/hf_import.py). The checkpoint's path on rank 0, None on the other ranks."""
    if env.world_size == 1:
        return import_hf(cfg, hf_dir, out, accepted=accepted)
    layout = layout_for(cfg, env.world_size)
    init_parallel(layout, env, torch.device("cpu"))
    try:
        path = import_hf(cfg, hf_dir, out, rank=env.rank, layout=layout, accepted=accepted)
    finally:
        dist.destroy_process_group()
    return path if env.rank == 0 else None
