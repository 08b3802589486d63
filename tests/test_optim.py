"""MuonClip (Newton–Schulz, Muon, AdamW, QK-Clip) and the WSD schedule (K2 §2.1, §2.5)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from k2train.config.schema import ModelConfig, OptimizerConfig
from k2train.model import K2Model
from k2train.model.attention import MLA
from k2train.model.rope import rope_cos_sin, rope_inv_freq, softmax_scale
from k2train.optim.muon_clip import MuonClip, split_param_groups
from k2train.optim.newton_schulz import K2_NS_COEFFICIENTS, newton_schulz, newton_schulz_many
from k2train.optim.qk_clip import apply_qk_clip_, qk_clip_scales
from k2train.optim.schedule import lr_at, wsd_lr

# The quintic (15x - 10x³ + 3x⁵)/8 converges to exactly 1: an (almost) exact orthogonaliser.
CONVERGENT_COEFFICIENTS = (1.875, -1.25, 0.375)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def _matrix_with_spectrum(n: int, m: int, singular_values: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    k = singular_values.numel()
    return U[:, :k] @ torch.diag(singular_values) @ V[:, :k].T


# ---------------------------------------------------------------- Newton–Schulz


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_newton_schulz_singular_values_land_in_band(shape):
    # Input singular values spread over a factor 100; five K2 steps in bf16 squeeze them into about
    # [0.68, 1.14] (measured), a spread below 2.
    k = min(shape)
    s_in = torch.logspace(0, 2, k)
    G = _matrix_with_spectrum(*shape, s_in, seed=0)
    s_out = torch.linalg.svdvals(newton_schulz(G))
    assert s_out.min() > 0.6 and s_out.max() < 1.25, (s_out.min(), s_out.max())
    assert s_out.max() / s_out.min() < 2.0 < (s_in.max() / s_in.min()) / 10
    gaussian = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    s_gauss = torch.linalg.svdvals(newton_schulz(gaussian))
    assert s_gauss.min() > 0.6 and s_gauss.max() < 1.25


def test_newton_schulz_matches_torch_and_float64():
    from torch.optim._muon import _zeropower_via_newtonschulz

    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    ours = newton_schulz(G)
    torch_ref = _zeropower_via_newtonschulz(G, K2_NS_COEFFICIENTS, 5, 1e-7).float()
    exact_iteration = newton_schulz(G, dtype=torch.float64)
    assert ours.dtype == torch.float32
    # Both bf16 implementations sit about 1.5% from the float64 iteration; they differ by rounding only.
    assert _rel(ours, exact_iteration) < 0.03
    assert _rel(ours, torch_ref) < 0.04


def test_newton_schulz_batched_equals_per_matrix_and_transposed():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(2, 3, 16, 40, generator=gen)
    batched = newton_schulz(G)
    for i in range(2):
        for j in range(3):
            assert torch.equal(batched[i, j], newton_schulz(G[i, j]))
    tall = torch.randn(40, 16, generator=gen)
    assert torch.equal(newton_schulz(tall), newton_schulz(tall.T.contiguous()).T)
    s_tall = torch.linalg.svdvals(newton_schulz(tall))
    assert s_tall.min() > 0.6 and s_tall.max() < 1.25


def test_newton_schulz_many_groups_by_shape():
    gen = torch.Generator().manual_seed(4)
    mats = [torch.randn(16, 24, generator=gen), torch.randn(3, 16, 24, generator=gen),
            torch.randn(24, 16, generator=gen), torch.randn(16, 24, generator=gen)]
    for got, G in zip(newton_schulz_many(mats), mats):
        assert got.shape == G.shape
        assert torch.equal(got, newton_schulz(G))


# ---------------------------------------------------------------- Muon


def _applied_update_rms(shape, coefficients, steps, seed):
    """RMS of (W_before - W_after)/lr per matrix slice, no weight decay; and the NS output's singular values."""
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(*shape, generator=gen))
    p.grad = torch.randn(*shape, generator=gen)
    opt = MuonClip([("w", p)], [], lr=1e-2, weight_decay=0.0, ns_steps=steps, ns_coefficients=coefficients,
                   qk_clip_tau=None)
    before = p.detach().clone()
    opt.step()
    update = ((before - p.detach()) / 1e-2).reshape(-1, *shape[-2:])
    rms = update.pow(2).mean(dim=(-2, -1)).sqrt()
    # The Nesterov input of the first step is (1 + μ)·G: the same direction as G.
    s = torch.linalg.svdvals(newton_schulz(p.grad, steps, coefficients)).reshape(-1, min(shape[-2:]))
    return rms, s.pow(2).mean(dim=-1).sqrt()


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (4, 16, 32)])
def test_muon_update_rms_matches_0_2(shape):
    # With an exact orthogonaliser, 0.2·sqrt(max(n, m)) makes every slice's update RMS 0.2.
    rms, _ = _applied_update_rms(shape, CONVERGENT_COEFFICIENTS, steps=25, seed=5)
    assert torch.allclose(rms, torch.full_like(rms, 0.2), rtol=0.03), rms
    # With the K2 coefficients it is 0.2 × the RMS of the NS singular values, about 0.16-0.19.
    rms_k2, s_rms = _applied_update_rms(shape, K2_NS_COEFFICIENTS, steps=5, seed=5)
    assert torch.allclose(rms_k2, 0.2 * s_rms, rtol=1e-3), (rms_k2, s_rms)
    assert ((rms_k2 > 0.15) & (rms_k2 < 0.2)).all(), rms_k2


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_two_steps_equal_direct_computation(nesterov):
    gen = torch.Generator().manual_seed(6)
    shapes = {"attn.weight": (24, 40), "experts.up_proj": (3, 16, 8)}
    params = {n: nn.Parameter(torch.randn(*s, generator=gen)) for n, s in shapes.items()}
    grads = [{n: torch.randn(*s, generator=gen) for n, s in shapes.items()} for _ in range(2)]
    lrs, mu, wd = (0.02, 0.01), 0.9, 0.1
    opt = MuonClip(list(params.items()), [], lr=lrs[0], weight_decay=wd, momentum=mu, nesterov=nesterov,
                   qk_clip_tau=None)
    expected = {n: p.detach().clone() for n, p in params.items()}
    momentum = {n: torch.zeros(s) for n, s in shapes.items()}
    for step in range(2):
        opt.set_lr(lrs[step])
        for n, p in params.items():
            p.grad = grads[step][n].clone()
        opt.step()
        for n, W in expected.items():
            G = grads[step][n]
            momentum[n] = mu * momentum[n] + G
            U = mu * momentum[n] + G if nesterov else momentum[n]
            slices = U.reshape(-1, *U.shape[-2:])
            O = torch.stack([newton_schulz(u) for u in slices]).reshape(U.shape)
            O = O * 0.2 * math.sqrt(max(U.shape[-2:]))
            expected[n] = W - lrs[step] * (O + wd * W)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- AdamW


def test_adamw_three_steps_equal_torch_adamw():
    gen = torch.Generator().manual_seed(7)
    shapes = {"embed_tokens.weight": (10, 6), "norm.weight": (6,)}
    ours = {n: nn.Parameter(torch.randn(*s, generator=gen)) for n, s in shapes.items()}
    ref = {n: nn.Parameter(p.detach().clone()) for n, p in ours.items()}
    kw = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    opt = MuonClip([], list(ours.items()), lr=1e-3, qk_clip_tau=None, **kw)
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-3, foreach=False, **kw)
    for lr in (1e-3, 3e-3, 2e-3):
        opt.set_lr(lr)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        for n in shapes:
            ours[n].grad = torch.randn(*shapes[n], generator=gen)
            ref[n].grad = ours[n].grad.clone()
        opt.step()
        ref_opt.step()
    for n in shapes:
        assert torch.equal(ours[n].detach(), ref[n].detach()), n


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(11)

    def build(seed_params):
        params = [nn.Parameter(t.clone()) for t in seed_params]
        return params, MuonClip([("w", params[0])], [("norm.weight", params[1])], lr=1e-2, weight_decay=0.1)

    init = [torch.randn(8, 12, generator=gen), torch.randn(12, generator=gen)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(2)]
    a_params, a = build(init)
    for p, g in zip(a_params, grads[0]):
        p.grad = g.clone()
    a.step()
    b_params, b = build([p.detach() for p in a_params])
    # A checkpoint holds copies; torch's load_state_dict would otherwise share a's state tensors.
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for opt, params in ((a, a_params), (b, b_params)):
        for p, g in zip(params, grads[1]):
            p.grad = g.clone()
        opt.step()
    for pa, pb in zip(a_params, b_params):
        assert torch.equal(pa.detach(), pb.detach())


# ---------------------------------------------------------------- classification and construction


def _tiny_model() -> K2Model:
    torch.manual_seed(0)
    return K2Model(ModelConfig())


def test_split_param_groups_on_the_model():
    model = _tiny_model()
    muon_named, adamw_named = split_param_groups(model.named_parameters())
    muon = {n for n, _ in muon_named}
    adamw = {n for n, _ in adamw_named}
    assert muon | adamw == {n for n, _ in model.named_parameters()} and not muon & adamw
    for name in ("layers.0.self_attn.q_b_proj.weight", "layers.0.mlp.gate_proj.weight",
                 "layers.1.mlp.gate.weight", "layers.1.mlp.experts.down_proj",
                 "layers.2.mlp.shared_experts.up_proj.weight", "layers.2.self_attn.kv_a_proj_with_mqa.weight"):
        assert name in muon, name
    for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.input_layernorm.weight",
                 "layers.1.self_attn.kv_a_layernorm.weight"):
        assert name in adamw, name
    assert all(p.ndim >= 2 for _, p in muon_named)
    assert not any("e_score_correction_bias" in n for n in muon | adamw)


def test_split_drops_frozen_and_routes_1d():
    a, b, c = nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2, 2))
    c.requires_grad_(False)
    muon, adamw = split_param_groups([("x.lm_head.weight", a), ("bias", b), ("frozen", c)])
    assert muon == [] and [n for n, _ in adamw] == ["x.lm_head.weight", "bias"]


def test_non_float32_params_are_refused():
    p = nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="layers.0.w.*sharded optimizer"):
        MuonClip([("layers.0.w", p)], [], lr=1e-3, weight_decay=0.1)


def test_from_config_step_and_qk_clip_on_the_model():
    model = _tiny_model()
    cfg = OptimizerConfig()
    tokens = torch.randint(0, ModelConfig().vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    out = model(tokens)
    tau = 0.5 * out.max_logits_LH.min().item()
    assert tau > 0
    opt = MuonClip.from_config(model, dataclasses.replace(cfg, qk_clip_tau=tau))
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    nn.functional.cross_entropy(out.logits_BSV.flatten(0, 1), tokens.flatten()).backward()
    before = model.lm_head.weight.detach().clone()
    opt.set_lr(lr_at(0, cfg))
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)
    with torch.no_grad():
        max_logits_LH = model(tokens).max_logits_LH
        counts = opt.qk_clip_(max_logits_LH)
        assert counts == [ModelConfig().num_heads] * ModelConfig().num_layers
        # Layer 0 sees the same input, so its every logit shrinks by exactly γ; later layers see the
        # changed output of the clipped layers before them, so only layer 0 is checked exactly.
        after_LH = model(tokens).max_logits_LH
        assert (after_LH[0] <= tau * (1 + 1e-4)).all() and (after_LH[0] >= tau * (1 - 1e-3)).all()
    off = MuonClip.from_config(model, dataclasses.replace(cfg, qk_clip=False))
    assert off.qk_clip_(max_logits_LH) == [0] * ModelConfig().num_layers


# ---------------------------------------------------------------- QK-Clip


def test_qk_clip_gamma_arithmetic():
    gamma = qk_clip_scales(torch.tensor([50.0, 200.0, 100.0, 400.0]), tau=100.0)
    assert gamma.tolist() == [1.0, 0.5, 1.0, 0.25]
    with pytest.raises(ValueError, match="non-finite"):
        qk_clip_scales(torch.tensor([1.0, float("inf")]), tau=100.0)
    H, dn, dr, dv, r = 2, 3, 2, 4, 5
    q_b = torch.randn(H * (dn + dr), r)
    kv_b = torch.randn(H * (dn + dv), r)
    q0, kv0 = q_b.clone(), kv_b.clone()
    clipped = apply_qk_clip_(q_b, kv_b, torch.tensor([1.0, 0.25]), dn, dr, dv)
    assert clipped.tolist() == [False, True]
    q, kv, q_ref, kv_ref = q_b.view(H, dn + dr, r), kv_b.view(H, dn + dv, r), q0.view(H, -1, r), kv0.view(H, -1, r)
    torch.testing.assert_close(q[1, :dn], q_ref[1, :dn] * 0.5)  # nope rows × sqrt(γ)
    torch.testing.assert_close(q[1, dn:], q_ref[1, dn:] * 0.25)  # rope rows × γ
    torch.testing.assert_close(kv[1, :dn], kv_ref[1, :dn] * 0.5)
    assert torch.equal(kv[1, dn:], kv_ref[1, dn:]) and torch.equal(q[0], q_ref[0]) and torch.equal(kv[0], kv_ref[0])
    c_q, c_kv, k_rope = torch.randn(r), torch.randn(r), torch.randn(dr)
    nope_before = (q_ref[1, :dn] @ c_q) @ (kv_ref[1, :dn] @ c_kv)
    rope_before = (q_ref[1, dn:] @ c_q) @ k_rope
    torch.testing.assert_close((q[1, :dn] @ c_q) @ (kv[1, :dn] @ c_kv), 0.25 * nope_before)
    torch.testing.assert_close((q[1, dn:] @ c_q) @ k_rope, 0.25 * rope_before)


def _direct_max_logits(q_b, kv_b, kv_a, c_q_TR, x_TD, H, dn, dr, dv, kv_rank, scale):
    """MLA logits written out from raw weights (no norms, no rotation, no mask): max per head [H]."""
    q_THK = (c_q_TR @ q_b.T).view(-1, H, dn + dr)
    latent, k_rope_TR = (x_TD @ kv_a.T).split([kv_rank, dr], dim=-1)
    k_nope_THN = (latent @ kv_b.T).view(-1, H, dn + dv)[..., :dn]
    nope = torch.einsum("thn,shn->hts", q_THK[..., :dn], k_nope_THN)
    rope = torch.einsum("thr,sr->hts", q_THK[..., dn:], k_rope_TR)
    return ((nope + rope) * scale).amax(dim=(1, 2))


def test_qk_clip_direct_computation_caps_head_zero():
    gen = torch.Generator().manual_seed(9)
    H, dn, dr, dv, q_rank, kv_rank, D, T = 4, 8, 4, 6, 12, 10, 16, 20
    q_b = torch.randn(H * (dn + dr), q_rank, generator=gen) * 0.3
    kv_b = torch.randn(H * (dn + dv), kv_rank, generator=gen) * 0.3
    kv_a = torch.randn(kv_rank + dr, D, generator=gen) * 0.3
    c_q, x = torch.randn(T, q_rank, generator=gen), torch.randn(T, D, generator=gen)
    args = (c_q, x, H, dn, dr, dv, kv_rank, (dn + dr) ** -0.5)
    tau = 2.0 * _direct_max_logits(q_b, kv_b, kv_a, *args).max().item()
    q_b.view(H, dn + dr, q_rank)[0] *= 3 * tau / _direct_max_logits(q_b, kv_b, kv_a, *args)[0]
    s_before = _direct_max_logits(q_b, kv_b, kv_a, *args)
    assert s_before[0] > tau and (s_before[1:] < tau).all()
    q0, kv0, kva0 = q_b.clone(), kv_b.clone(), kv_a.clone()
    clipped = apply_qk_clip_(q_b, kv_b, qk_clip_scales(s_before, tau), dn, dr, dv)
    assert clipped.tolist() == [True, False, False, False]
    s_after = _direct_max_logits(q_b, kv_b, kv_a, *args)
    assert tau * (1 - 1e-4) <= s_after[0] <= tau * (1 + 1e-5)
    assert torch.equal(s_after[1:], s_before[1:])
    assert torch.equal(q_b[dn + dr:], q0[dn + dr:]) and torch.equal(kv_b[dn + dv:], kv0[dn + dv:])
    assert torch.equal(kv_b[dn:dn + dv], kv0[dn:dn + dv]) and torch.equal(kv_a, kva0)


def test_qk_clip_on_the_mla_module():
    cfg = ModelConfig()
    torch.manual_seed(10)
    mla = MLA(cfg, softmax_scale(cfg))
    H, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    x = torch.randn(2, 12, cfg.hidden_size)
    inv_freq, factor = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, factor, 12, torch.float32)
    with torch.no_grad():
        s0 = mla(x, cos, sin)[1]
        tau = 2.0 * s0.abs().max().item()
        mla.q_b_proj.weight.view(H, dn + dr, -1)[0] *= 3 * tau / s0[0]
        s_before = mla(x, cos, sin)[1]
    assert s_before[0] > tau and (s_before[1:] < tau).all()
    snapshot = {n: p.detach().clone() for n, p in mla.named_parameters()}
    opt = MuonClip(list(mla.named_parameters()), [], lr=0.0, weight_decay=0.0, attention_modules=[mla],
                   qk_clip_tau=tau)
    assert opt.qk_clip_(s_before[None]) == [1]
    with torch.no_grad():
        s_after = mla(x, cos, sin)[1]
    assert tau * (1 - 1e-4) <= s_after[0] <= tau * (1 + 1e-5)
    assert torch.equal(s_after[1:], s_before[1:])
    q_b, kv_b = mla.q_b_proj.weight.detach(), mla.kv_b_proj.weight.detach()
    assert torch.equal(q_b[dn + dr:], snapshot["q_b_proj.weight"][dn + dr:])
    assert torch.equal(kv_b[dn + dv:], snapshot["kv_b_proj.weight"][dn + dv:])
    assert torch.equal(kv_b[dn:dn + dv], snapshot["kv_b_proj.weight"][dn:dn + dv])
    for name in ("kv_a_proj_with_mqa.weight", "q_a_proj.weight", "o_proj.weight"):
        assert torch.equal(mla.get_parameter(name), snapshot[name]), name
    with pytest.raises(ValueError, match="expected \\[1 layers, heads\\]"):
        opt.qk_clip_(s_before)


# ---------------------------------------------------------------- WSD schedule


def test_wsd_schedule_shape():
    lr, min_lr, warmup, stable, decay = 2e-4, 2e-5, 10, 20, 40
    at = lambda step: wsd_lr(step, lr, min_lr, warmup, stable, decay)  # noqa: E731
    assert at(0) == pytest.approx(lr / warmup)
    assert at(4) == pytest.approx(lr * 5 / warmup)
    assert at(warmup - 1) == pytest.approx(lr)
    assert all(at(s) == lr for s in range(warmup, warmup + stable + 1))
    assert at(warmup + stable + decay // 2) == pytest.approx((lr + min_lr) / 2)
    decay_lrs = [at(s) for s in range(warmup + stable, warmup + stable + decay + 1)]
    assert all(a > b for a, b in zip(decay_lrs, decay_lrs[1:]))
    assert at(warmup + stable + decay) == min_lr and at(10**6) == min_lr
    assert wsd_lr(0, lr, min_lr, 0, 5, 5) == lr
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        wsd_lr(0, lr, min_lr, -1, 5, 5)
    cfg = OptimizerConfig()
    assert lr_at(cfg.warmup_steps + 7, cfg) == cfg.lr
    assert lr_at(cfg.warmup_steps + cfg.stable_steps + cfg.decay_steps, cfg) == cfg.min_lr
