"""Per-rank parameter counts of the k2_1t layout, built on the meta device."""

from __future__ import annotations

from pathlib import Path

from k2train.config.load import load_config
from k2train.model import count_parameters
from parallel.plan.params import describe_params, model_parallel_group, rank_params
from parallel.layout import layout_for

K2_1T = Path(__file__).parents[1] / "configs" / "k2_1t.yaml"


def test_k2_1t_model_parallel_group_holds_the_whole_model_once():
    cfg = load_config(K2_1T)
    layout = layout_for(cfg, 32 * 8)
    group = [rank_params(cfg, layout, rank) for rank in model_parallel_group(layout)]
    total, _ = count_parameters(cfg.model)
    m = cfg.model
    routed = m.num_moe_layers * m.num_experts * 3 * m.hidden_size * m.moe_intermediate_size
    assert sum(r.owned for r in group) == total
    assert sum(r.expert for r in group) == routed
    # Dense weights sit on every EP rank of their stage.
    assert sum(r.held for r in group) - total == (layout.ep - 1) * (total - routed)
    # Every EP rank holds 384 / 16 = 24 experts of each of its MoE layers.
    per_expert = 3 * m.hidden_size * m.moe_intermediate_size
    assert all(r.expert % (24 * per_expert) == 0 for r in group)


def test_report_names_the_ranks_and_the_equality():
    cfg = load_config(K2_1T)
    text = describe_params(cfg, layout_for(cfg, 64 * 8), [0, 17, 511])
    assert "   511  15  15   1" in text
    assert "= model total 1,026,408,209,408 (equal)" in text
