"""Bytes autograd saves for backward, derived from the model's code: per layer, per pipeline stage.

Each function lists the tensors the ops of `k2train/model` save (`save_for_backward` or an op's
own saved inputs/outputs), keyed by the storage they keep alive, as `k2train.memory.saved_bytes`
counts them: each storage once, parameters excluded. The list changes with the memory features
(K2 §2.4.3):
- memory.fp8_activations: the inputs of the up-projections (`fp8_saved_linear`,
  `fp8_saved_grouped_mm`) and of SwiGLU are kept as FP8 tiles, 1 byte per element plus one FP32
  scale per 1x128 tile; each of gate and up quantises its input separately, so x is kept twice;
- memory.selective_recompute: RMSNorms, SwiGLU with its down-projection and the MLA
  up-projections keep only their inputs (non-reentrant checkpointing saves just those);
  with both on, SwiGLU's inputs are kept by the recomputation in the compute dtype.
Attention is counted as the eager path of `k2train/model/attention.py` keeps it (the S x S
probabilities in FP32, plus their compute-dtype copy, and the causal mask; CPU), or as the Triton
flash kernel `k2train/kernels/flash_attention.py` does (q, k, v, output and the FP32 row
log-sum-exp, no S x S term; CUDA).

Routed rows are the one data-dependent count: the plan assumes balanced routing, so an EP rank
receives as many rows as it sends (T * top-k); a real step's ranks differ by the router's imbalance.
Integer tensors (indices, offsets, masks) are kept apart from floating-point ones because
activation offload moves only the floating-point ones to host memory, and so are the loss's
tensors, which are saved outside the model's saved-tensor hooks and stay on the device.
`stage_offloaded` gives the bytes the offloader copies per micro-batch, as its hooks see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from k2train.config.schema import ModelConfig

FP8_TILE = 128  # K2 §2.4.3: 1x128 tiles with one FP32 scale each
ATTENTION_KINDS = ("eager", "fused")


@dataclass(frozen=True)
class ActivationSettings:
    """What decides the saved bytes of one micro-batch: its shape, the compute dtype and the features."""

    batch: int  # sequences per micro-batch
    seq: int
    dtype_bytes: int  # bytes per element of the compute dtype (train.param_dtype)
    fp8: bool  # memory.fp8_activations
    recompute: bool  # memory.selective_recompute
    attention: str = "eager"  # "eager" (the model's path today) or "fused"
    ep: int = 1  # >1: routed rows go through the all-to-all exchange (parallel/experts.py)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Saved:
    """Saved-tensor bytes split by what activation offload does with them."""

    floating: int = 0  # floating-point (incl. FP8) tensors: offloaded to host when offload is on
    integer: int = 0  # indices, offsets, masks: stay on the device
    kept: int = 0  # floating-point tensors of the loss, saved outside the offloader's hooks: stay too

    @property
    def total(self) -> int:
        return self.floating + self.integer + self.kept

    @property
    def on_device(self) -> int:
        """What stays on the device when activation offload is on."""
        return self.integer + self.kept

    def __add__(self, other: Saved) -> Saved:
        return Saved(self.floating + other.floating, self.integer + other.integer, self.kept + other.kept)

    def scaled(self, factor: int) -> Saved:
        return Saved(self.floating * factor, self.integer * factor, self.kept * factor)


class _Storages:
    """Saved storages by key: a storage saved by several ops (h by q_a_proj and kv_a_proj) counts once."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, str]] = {}

    def add(self, key: str, nbytes: int, kind: str = "floating") -> None:
        """`kind` is the `Saved` field the storage counts in: floating, integer or kept."""
        self.items.setdefault(key, (nbytes, kind))

    def saved(self) -> Saved:
        by_kind = {kind: sum(n for n, k in self.items.values() if k == kind) for kind in ("floating", "integer", "kept")}
        return Saved(**by_kind)


def fp8_bytes(rows: int, cols: int) -> int:
    """FP8 tiles of a [rows, cols] tensor: 1 byte per element and a 4-byte scale per 1x128 tile."""
    return rows * cols + 4 * rows * math.ceil(cols / FP8_TILE)


def _norm(s: _Storages, a: ActivationSettings, name: str, input_key: str, input_bytes: int, rows: int, width: int) -> None:
    """RMSNorm (k2train/model/norm.py): x.float() (x itself in FP32), rsqrt [rows, 1] and the
    normalised y saved by `weight * y`; recomputed, only its input."""
    p = a.dtype_bytes
    if a.recompute or p == 4:
        s.add(input_key, input_bytes)
    else:
        s.add(f"{name}.x_f32", 4 * rows * width)
    if not a.recompute:
        s.add(f"{name}.rsqrt", 4 * rows)
        s.add(f"{name}.y", p * rows * width)


def _swiglu(s: _Storages, a: ActivationSettings, name: str, input_key: str, rows: int, dim: int, width: int) -> None:
    """SwiGLU (ffn.py) or the routed experts (moe.py `Experts`) over `rows` rows of `input_key`."""
    p = a.dtype_bytes
    if a.fp8:
        # gate and up share one FP8 copy of x (k2train/memory/fp8.py quantize_shared_input).
        s.add(f"{name}.x_fp8", fp8_bytes(rows, dim))
    else:
        s.add(input_key, p * rows * dim)
    if a.recompute and a.fp8:
        # SwiGLU and down run again from FP8 gate and up (k2train/memory/fp8_recompute.py).
        s.add(f"{name}.gate_fp8", fp8_bytes(rows, width))
        s.add(f"{name}.up_fp8", fp8_bytes(rows, width))
    elif a.recompute:
        s.add(f"{name}.gate", p * rows * width)  # the region's inputs
        s.add(f"{name}.up", p * rows * width)
    elif a.fp8:
        s.add(f"{name}.gate_fp8", fp8_bytes(rows, width))
        s.add(f"{name}.up_fp8", fp8_bytes(rows, width))
        s.add(f"{name}.hidden", p * rows * width)  # the down-projection's input
    else:
        for t in ("gate", "silu", "up", "hidden"):
            s.add(f"{name}.{t}", p * rows * width)


def _attention(s: _Storages, cfg: ModelConfig, a: ActivationSettings) -> None:
    """MLA (attention.py) from the normalised input h to the o_proj input."""
    p, T, B, S = a.dtype_bytes, a.tokens, a.batch, a.seq
    H, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
    s.add("h", p * T * cfg.hidden_size)  # q_a_proj and kv_a_proj_with_mqa inputs
    # q: q_a output -> (norm -> q_b) up-projection, recomputed as one region.
    _norm(s, a, "q_norm", "q_latent", p * T * rq, T, rq)
    if not a.recompute:
        s.add("q_normed", p * T * rq)  # q_b_proj input
    # kv: the latent is a view of kv_a's [T, rkv + dr] output, whose storage it keeps.
    kv_a = p * T * (rkv + dr)
    if a.recompute or p == 4:
        s.add("kv_a", kv_a)
    else:
        s.add("kv_norm.x_f32", 4 * T * rkv)  # .float() of the strided view: a new contiguous copy
    if not a.recompute:
        s.add("kv_norm.rsqrt", 4 * T)
        s.add("kv_norm.y", p * T * rkv)
        s.add("kv_normed", p * T * rkv)  # kv_b_proj input
    # Rope saves only cos/sin (per stage); q and k are new tensors after the concatenation.
    s.add("q", p * T * H * (dn + dr))
    s.add("k", p * T * H * (dn + dr))
    if a.attention == "eager" and B == 1:
        # [1, H, S, dv] -> [H, S, dv] for the batched matmul is a view of kv_b's output, whose
        # storage (k's nope part included) it keeps.
        s.add("kv_b_out", p * T * H * (dn + dv))
    elif a.attention == "eager":
        s.add("v", p * T * H * dv)  # [B, H, S, dv] -> [B*H, S, dv] for the batched matmul: a copy
    if a.attention == "eager":
        s.add("probs_f32", 4 * B * H * S * S)  # softmax result
        if p != 4:
            s.add("probs", p * B * H * S * S)  # its compute-dtype copy, the second matmul's input
        s.add("mask", S * S, kind="integer")
    else:
        # k2train/kernels/flash_attention.py saves q, k, v (a view of kv_b's output, whose
        # storage it keeps), its output and the base-2 log-sum-exp [B*H, S].
        s.add("kv_b_out", p * T * H * (dn + dv))
        s.add("attn_out", p * T * H * dv)
        s.add("lse", 4 * B * H * S)
    s.add("o_in", p * T * H * dv)  # o_proj input: the heads transposed back, a copy


def _moe(s: _Storages, cfg: ModelConfig, a: ActivationSettings) -> None:
    """Router, dispatch, routed experts, combine and shared experts (moe.py, expert_parallel.py)."""
    p, T, D, E, K = a.dtype_bytes, a.tokens, cfg.hidden_size, cfg.num_experts, cfg.experts_per_token
    N = T * K  # (token, expert) rows; balanced routing: an EP rank also receives N
    if p == 4:
        s.add("h2", 4 * T * D)  # router input x.float() is x
    else:
        s.add("router.x_f32", 4 * T * D)
        s.add("router.w_f32", 4 * E * D)  # weight.float(): a copy, not the parameter
    s.add("router.scores", 4 * T * E)  # sigmoid result
    s.add("router.topk", 8 * T * K, kind="integer")
    s.add("router.weights", 4 * T * K)  # divided by their sum: numerator and denominator
    s.add("router.sum", 4 * T)
    s.add("token_N", 8 * N, kind="integer")  # x_TD[token_N] and the scatter-add back
    s.add("order_N", 8 * N, kind="integer")  # weight_TK.flatten()[order_N]
    if a.ep > 1:
        s.add("by_expert_M", 8 * N, kind="integer")  # arrivals regrouped by local expert
        s.add("unsort_M", 8 * N, kind="integer")  # and back
    s.add("offsets", 4 * (E // a.ep), kind="integer")
    _swiglu(s, a, "experts", "x_ND", N, D, cfg.moe_intermediate_size)
    # The experts multiply their outputs by the combine weights (k2train/model/moe.py). With
    # recomputation that runs again with the down-projection, which keeps only the weights; without
    # it the multiplication keeps the down-projection's output too. The scatter-add back to the
    # tokens keeps only token_N.
    if not a.recompute:
        s.add("y_ND", p * N * D)
    s.add("combine_w", p * N)
    if cfg.num_shared_experts:
        _swiglu(s, a, "shared", "h2", T, D, cfg.moe_intermediate_size * cfg.num_shared_experts)


def layer_saved(cfg: ModelConfig, a: ActivationSettings, moe: bool) -> tuple[Saved, int]:
    """(saved bytes of one decoder layer on one micro-batch, the part of them that is the layer's input).

    The input is kept by input_layernorm when it is recomputed or computes in FP32; for the first
    layer of a stage that storage is the stage's received activation, counted with the pipeline
    buffers instead.
    """
    s = _layer_storages(cfg, a, moe)
    input_bytes = s.items["x_in"][0] if "x_in" in s.items else 0
    return s.saved(), input_bytes


def layer_tensors(cfg: ModelConfig, a: ActivationSettings, moe: bool) -> list[tuple[str, int]]:
    """(name, bytes) of every storage one decoder layer saves on one micro-batch, largest first."""
    items = _layer_storages(cfg, a, moe).items
    return sorted(((name, n) for name, (n, _) in items.items()), key=lambda item: -item[1])


def _layer_storages(cfg: ModelConfig, a: ActivationSettings, moe: bool) -> _Storages:
    p, T, D = a.dtype_bytes, a.tokens, cfg.hidden_size
    if a.attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {a.attention!r}.")
    s = _Storages()
    _norm(s, a, "input_norm", "x_in", p * T * D, T, D)
    _attention(s, cfg, a)
    _norm(s, a, "post_norm", "x2", p * T * D, T, D)  # x2 = x + attention
    if moe:
        _moe(s, cfg, a)
    else:
        _swiglu(s, a, "ffn", "h2", T, D, cfg.dense_intermediate_size)
    return s


def head_saved(cfg: ModelConfig, a: ActivationSettings, loss: bool = True) -> Saved:
    """Final norm, lm_head input and, with `loss`, the FP32 log-softmax the cross-entropy keeps."""
    p, T, D = a.dtype_bytes, a.tokens, cfg.hidden_size
    s = _Storages()
    _norm(s, a, "final_norm", "x_last", p * T * D, T, D)
    s.add("head_in", p * T * D)
    if loss:
        # The loss runs outside the model (parallel/pipeline/stages.py lm_loss), so outside the hooks.
        s.add("log_softmax", 4 * T * cfg.vocab_size, kind="kept")
        s.add("nll_total_weight", 4, kind="kept")  # a 0-dim FP32 tensor
    return s.saved()


def stage_saved(cfg: ModelConfig, a: ActivationSettings, layers: range, embedding: bool, head: bool,
                loss: bool = True) -> Saved:
    """Saved bytes of one virtual stage on one micro-batch (with the loss on the last stage), without
    its received input (a pipeline buffer) and without the tokens and labels (the step's batch)."""
    total = Saved(floating=a.seq * cfg.qk_rope_head_dim * a.dtype_bytes)  # rope cos and sin, [S, dr/2] each
    for i, layer in enumerate(layers):
        saved, input_bytes = layer_saved(cfg, a, layer >= cfg.first_dense_layers)
        if i == 0 and not embedding:
            saved = replace(saved, floating=saved.floating - input_bytes)
        total = total + saved
    if head:
        total = total + head_saved(cfg, a, loss)
    return total


def stage_offloaded(cfg: ModelConfig, a: ActivationSettings, layers: range, embedding: bool, head: bool) -> int:
    """Bytes activation offload copies to host per micro-batch of one virtual stage, as the hooks of
    `k2train/memory/saved.py` see them: the floating-point saved tensors of the stage's forward, plus
    the received input where the first layer's norm keeps it (recomputed, or computed in FP32), plus
    rope's cos and sin once per layer (the host copies are shared within one layer's scope only, so
    that no freed address is ever taken for a copied one), without the loss (outside the hooks)."""
    saved = stage_saved(cfg, a, layers, embedding, head)
    rope = a.seq * cfg.qk_rope_head_dim * a.dtype_bytes
    received = layer_saved(cfg, a, layers[0] >= cfg.first_dense_layers)[1] if len(layers) and not embedding else 0
    return saved.floating + (len(layers) - 1) * rope + received


def per_token(cfg: ModelConfig, a: ActivationSettings, moe: bool) -> float:
    """Saved bytes per token of one decoder layer (sequence-length terms spread over the tokens)."""
    saved, _ = layer_saved(cfg, a, moe)
    return saved.total / a.tokens
