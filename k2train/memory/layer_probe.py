"""One MoE decoder layer as an expert-parallel rank runs it, for memory measurements.

Benchmarks (saved bytes per token on CPU, time and peak memory on a GPU) need a K2 MoE layer at
real widths without the rest of the model: `moe_layer(cfg, local_experts, policy)` builds the model part of
one MoE layer (no embedding, no head) whose router spans all `cfg.num_experts` experts while only
`local_experts` of them are built, as on one EP rank (K2: 384 / EP 16 = 24). The rows routed to
the 384 experts are handed to the 24 local ones in contiguous runs (`fold_exchange`), so the rank
computes and saves what it would after the all-to-all; the all-to-all itself saves nothing.

`saved_per_token` runs one forward under the saved-tensor hooks (`SavedActivations`), with or
without activation offload, and returns the layer's bytes per token by place; the other memory
features are the layer's `SavePolicy`, so each combination is its own layer (same seed, same weights).
"""

from __future__ import annotations

import dataclasses

import torch

from k2train.config.schema import ModelConfig
from k2train.memory.offload import ActivationOffloader
from k2train.memory.policy import SavePolicy
from k2train.memory.saved import DEVICE, OFFLOADED, SavedActivations
from k2train.model import K2Model, ModelPart
from k2train.model.moe import Experts

FEATURES = {  # the combinations the memory benchmarks report, in order
    "none": (False, False, False),
    "recompute": (False, True, False),
    "recompute + fp8": (True, True, False),
    "recompute + fp8 + offload": (True, True, True),
}


def fold_exchange(x_ND: torch.Tensor, weight_N: torch.Tensor, counts_E: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Rows sorted by global expert -> the local experts, each taking a contiguous run of experts'
    rows (E / E_local experts each), so every row is computed once, as after the all-to-all."""
    return experts(x_ND, counts_E.view(experts.num_local, -1).sum(dim=1), weight_N)


def moe_layer(cfg: ModelConfig, local_experts: int, seed: int = 0, policy: SavePolicy = SavePolicy()) -> K2Model:
    """The model part holding the first MoE layer of `cfg`, with `local_experts` routed experts,
    saving for backward what `policy` says."""
    if cfg.num_experts % local_experts:
        raise ValueError(f"local_experts={local_experts} must divide model.num_experts={cfg.num_experts}.")
    layer = cfg.first_dense_layers
    if layer >= cfg.num_layers:
        raise ValueError(f"{cfg.num_layers} layers, all dense (model.first_dense_layers): no MoE layer to probe.")
    part = ModelPart(range(layer, layer + 1), embedding=False, head=False, num_local_experts=local_experts)
    model = K2Model(dataclasses.replace(cfg, num_layers=layer + 1), part, seed=seed, policy=policy)
    block = model.layers[str(layer)]
    block.mlp.exchange = fold_exchange
    return model


def saved_per_token(model: K2Model, x_BSD: torch.Tensor, offload: bool) -> dict[str, float]:
    """Bytes per token the layer saves for backward, {"device": ..., "offloaded": ...}."""
    offloader = ActivationOffloader(x_BSD.device) if offload else None
    saved = SavedActivations([model], offloader)
    try:
        with saved.record("probe", tokens=x_BSD.shape[0] * x_BSD.shape[1]):
            model(x_BSD)
    finally:
        saved.close()
    tokens = saved.bytes.tokens
    return {DEVICE: saved.bytes.total(DEVICE) / tokens, OFFLOADED: saved.bytes.total(OFFLOADED) / tokens}
