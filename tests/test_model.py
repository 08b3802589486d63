"""The K2 model against transformers.DeepseekV3ForCausalLM, and its own invariants."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from k2train.config.schema import ModelConfig, YarnConfig
from k2train.model import K2Model, ModelPart, count_parameters
from k2train.model.hf_names import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from k2train.model.moe import update_router_bias_

transformers = pytest.importorskip("transformers")

# Several MoE layers and a dense first layer (the parity requirement).
PARITY_CFG = ModelConfig(num_layers=4, first_dense_layers=1, num_experts=8, experts_per_token=3)


def _random_model(cfg: ModelConfig, seed: int = 0) -> K2Model:
    torch.manual_seed(seed)
    model = K2Model(cfg)
    with torch.no_grad():
        for bias in model.router_biases():
            bias.normal_(0.0, 0.05)  # non-zero biases so selection-only use is exercised
        for name, p in model.named_parameters():
            if "layernorm" in name or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def _to_hf(model: K2Model, tmp_path: pathlib.Path):
    json.dump(hf_config_dict(model.cfg), open(tmp_path / "config.json", "w"))
    save_file(to_hf_state_dict(model.state_dict()), str(tmp_path / "model.safetensors"))
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("yarn", [None, YarnConfig(factor=4.0, original_max_position_embeddings=16)])
def test_logits_match_transformers_deepseek_v3(tmp_path, yarn):
    cfg = dataclasses.replace(PARITY_CFG, yarn=yarn)
    model = _random_model(cfg)
    hf = _to_hf(model, tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens).logits_BSV, hf(tokens).logits
    assert _rel_err(ours, theirs) <= 1e-5


def test_router_bias_changes_selection_only(tmp_path):
    """The bias picks experts but never enters the combine weights: a large bias on one expert
    routes every token to it in both models, and the two still agree."""
    model = _random_model(PARITY_CFG)
    with torch.no_grad():
        model.router_biases()[0][3] = 10.0
    hf = _to_hf(model, tmp_path)
    tokens = torch.randint(0, PARITY_CFG.vocab_size, (1, 16))
    with torch.no_grad():
        out = model(tokens)
        theirs = hf(tokens).logits
    assert out.expert_counts_ME[0, 3] == 16
    assert _rel_err(out.logits_BSV, theirs) <= 1e-5


def test_max_logits_equal_reference_attention_logits(tmp_path, monkeypatch):
    """Per-head max logits equal the max of q·k·scale computed by transformers' own attention code."""
    model = _random_model(PARITY_CFG)
    hf = _to_hf(model, tmp_path)
    seen: list[torch.Tensor] = []
    modeling = transformers.models.deepseek_v3.modeling_deepseek_v3
    eager_attention = modeling.eager_attention_forward

    def recording_attention(module, query, key, value, attention_mask, scaling, **kwargs):
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
        seen.append(logits.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)))
        return eager_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", recording_attention)
    tokens = torch.randint(0, PARITY_CFG.vocab_size, (3, 20))
    with torch.no_grad():
        ours = model(tokens).max_logits_LH
        hf(tokens)
    assert ours.shape == (PARITY_CFG.num_layers, PARITY_CFG.num_heads)
    torch.testing.assert_close(ours, torch.stack(seen), rtol=1e-5, atol=1e-6)


def test_grouped_mm_experts_equal_loop_reference():
    cfg = dataclasses.replace(PARITY_CFG, expert_impl="loop")
    loop_model = _random_model(cfg)
    grouped_model = _random_model(dataclasses.replace(cfg, expert_impl="grouped_mm"))
    grouped_model.load_state_dict(loop_model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    outs = []
    for model in (loop_model, grouped_model):
        out = model(tokens)
        out.logits_BSV.square().mean().backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = outs
    torch.testing.assert_close(a.logits_BSV, b.logits_BSV, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.expert_counts_ME, b.expert_counts_ME)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7, msg=name)


def test_hf_state_dict_round_trip():
    model = _random_model(PARITY_CFG)
    hf = to_hf_state_dict(model.state_dict())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in hf
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in hf
    back = from_hf_state_dict(hf, PARITY_CFG)
    assert back.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name
    del hf["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"experts\.5\.up_proj"):
        from_hf_state_dict(hf, PARITY_CFG)


def test_router_bias_update_moves_toward_balance():
    bias = torch.zeros(4)
    update_router_bias_(bias, torch.tensor([10, 2, 4, 4]), rate=0.01)
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


def test_parameter_count_matches_modules():
    for cfg in (PARITY_CFG, dataclasses.replace(PARITY_CFG, num_shared_experts=2, first_dense_layers=2)):
        model = K2Model(cfg)
        total, active = count_parameters(cfg)
        assert total == sum(p.numel() for p in model.parameters())
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        assert total - active == cfg.num_moe_layers * (cfg.num_experts - cfg.experts_per_token) * per_expert


def test_grouped_mm_alignment_is_checked():
    with pytest.raises(ValueError, match="moe_intermediate_size=30"):
        K2Model(dataclasses.replace(PARITY_CFG, moe_intermediate_size=30))
    K2Model(dataclasses.replace(PARITY_CFG, moe_intermediate_size=30, expert_impl="loop"))


def test_model_code_never_imports_torch_distributed():
    """The model is applied to a layout from parallel/, it never reaches for one itself."""
    model_dir = pathlib.Path(__file__).parents[1] / "k2train" / "model"
    for path in model_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            assert not any(n.startswith("torch.distributed") for n in names), f"{path}: {names}"


def test_a_part_starts_from_the_same_weights_as_the_whole_model():
    """A pipeline stage holding an expert slice draws exactly the whole model's values for its parameters."""
    whole = K2Model(PARITY_CFG, seed=7).state_dict()
    part = K2Model(
        PARITY_CFG, ModelPart(range(2, 4), embedding=False, head=True, first_expert=4, num_local_experts=4), seed=7
    )
    for name, tensor in part.state_dict().items():
        expected = whole[name][4:8] if ".mlp.experts." in name else whole[name]
        assert torch.equal(tensor, expected), name
    assert "embed_tokens.weight" not in part.state_dict() and "layers.1.mlp.gate.weight" not in part.state_dict()
    assert not torch.equal(K2Model(PARITY_CFG, seed=8).state_dict()["lm_head.weight"], whole["lm_head.weight"])


def test_parts_chained_equal_the_whole_model():
    whole = K2Model(PARITY_CFG, seed=3)
    first = K2Model(PARITY_CFG, ModelPart(range(0, 2), embedding=True, head=False), seed=3)
    last = K2Model(PARITY_CFG, ModelPart(range(2, 4), embedding=False, head=True), seed=3)
    tokens = torch.randint(0, PARITY_CFG.vocab_size, (2, 12))
    out_first = first(tokens)
    out_last = last(out_first.output)
    reference = whole(tokens)
    torch.testing.assert_close(out_last.output, reference.output, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.cat([out_first.max_logits_LH, out_last.max_logits_LH]), reference.max_logits_LH)
    assert torch.equal(torch.cat([out_first.expert_counts_ME, out_last.expert_counts_ME]), reference.expert_counts_ME)
