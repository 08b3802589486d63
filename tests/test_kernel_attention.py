"""The Triton flash attention that reports each head's max logit (QK-Clip's S_max, K2 §2.1 and
docs/ARCHITECTURE.md#h200-limits), against the eager reference, under the CPU interpreter.

The kernels run in one child process started with TRITON_INTERPRET=1 (tests/triton_interpret.py);
it builds the inputs below from fixed seeds and saves the kernel's outputs and gradients, and the
tests compare them here with the eager reference on the same inputs. The interpreter truncates
FP32 -> BF16 where the GPU rounds to nearest even (P is cast before the P·V and dS·K products), so
half-precision results are held to eager attention's own error, not to bits.

Shapes are tiny but cover what the kernel branches on: a sequence that is not a multiple of the
16-row interpreter tile, qk head dims split into a power-of-two part and a padded rest (24 = 16 + 16
with 8 masked columns; MLA's 192 = 128 + 64), a qk dim with no rest (16), a padded v dim (24), and
strided q/k/v built the way MLA builds them (cat, expand, split of transposed views).
"""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpret import run_interpreted

from k2train.model.attention import causal_attention_with_max_logits, eager_causal_attention_with_max_logits

# name: (B, H, S, qk head dim, v head dim, dtype, inputs)
CASES = {
    "fp32_mla_views": (2, 2, 40, 24, 16, torch.float32, "mla_views"),
    "fp32_dyadic": (1, 2, 40, 24, 16, torch.float32, "dyadic"),
    "fp32_k2_head_dims": (1, 2, 48, 192, 128, torch.float32, "randn"),
    "fp32_no_rest_padded_v": (2, 1, 33, 16, 24, torch.float32, "randn"),
    "bf16": (1, 2, 40, 24, 16, torch.bfloat16, "mla_views"),
    "fp16": (1, 2, 32, 24, 16, torch.float16, "randn"),
}
FP32_CASES = [name for name, case in CASES.items() if case[5] == torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).requires_grad_()


def _mla_views(B: int, H: int, S: int, DK: int, DV: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v as MLA makes them: q = cat(nope, rope) of a transposed view, k's rope part one key
    expanded over the heads, v a split of a transposed [B, S, H, nope + v] projection."""
    dr = DK // 3
    q_BSHK = _leaf(torch.randn(B, S, H, DK, generator=_gen(1)), dtype)
    kv_BSHX = _leaf(torch.randn(B, S, H, DK - dr + DV, generator=_gen(2)), dtype)
    k_rope_B1SR = _leaf(torch.randn(B, 1, S, dr, generator=_gen(3)), dtype)
    q_nope, q_rope = q_BSHK.transpose(1, 2).split([DK - dr, dr], dim=-1)
    k_nope, v = kv_BSHX.transpose(1, 2).split([DK - dr, DV], dim=-1)
    return torch.cat([q_nope, q_rope], -1), torch.cat([k_nope, k_rope_B1SR.expand(B, H, S, dr)], -1), v


def _dyadic(B: int, H: int, S: int, DK: int, DV: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Multiples of 1/8 in [-1, 1]: every q·k is exact in fp32 in any summation order, so the
    kernel's max logit must equal the reference's bit for bit. In head 0 the largest q·k (= DK) pairs
    query 0 with the last key, which it must not see; head 1's logits are all negative, so a padded
    query row (whose scores are 0) leaking into the max would show."""
    q, k = (torch.randint(-8, 9, (B, H, S, DK), generator=_gen(seed)) / 8 for seed in (1, 2))
    q[:, 0, 0], k[:, 0, -1] = 1.0, 1.0
    q[:, 1], k[:, 1] = q[:, 1].abs() + 0.125, -k[:, 1].abs() - 0.125
    return _leaf(q, dtype), _leaf(k, dtype), _leaf(torch.randn(B, H, S, DV, generator=_gen(3)), dtype)


def make_inputs(name: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, float]:
    """((q, k, v) requiring grad, dout, scale) for a case, in the case's dtype."""
    B, H, S, DK, DV, dtype, kind = CASES[name]
    if kind == "mla_views":
        qkv = _mla_views(B, H, S, DK, DV, dtype)
    elif kind == "dyadic":
        qkv = _dyadic(B, H, S, DK, DV, dtype)
    else:
        qkv = tuple(_leaf(torch.randn(B, H, S, d, generator=_gen(seed)), dtype)
                    for seed, d in ((1, DK), (2, DK), (3, DV)))
    return qkv, torch.randn(B, H, S, DV, generator=_gen(4)).to(dtype), DK**-0.5


def _outputs(attention, name: str) -> dict[str, torch.Tensor]:
    (q, k, v), dout, scale = make_inputs(name)
    out, max_logit = attention(q, k, v, scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return {"out": out.detach(), "max_logit": max_logit, "dq": dq, "dk": dk, "dv": dv}


def _run_kernels(path: str) -> None:
    """The child: runs the interpreted kernel on every case and a few bad inputs, saves the results."""
    from k2train.kernels.flash_attention import flash_attention_with_max_logits

    results = {name: _outputs(flash_attention_with_max_logits, name) for name in CASES}
    errors = []
    x = torch.zeros(1, 2, 8, 16)
    for bad in ((x, x[:, :1], x), (x, x, x.double()), (x[0], x[0], x[0])):
        try:
            flash_attention_with_max_logits(*bad, 1.0)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    results["errors"] = errors
    torch.save(results, path)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> dict:
    return run_interpreted(__file__, tmp_path_factory)


def _reference(name: str, upcast: bool = False) -> dict[str, torch.Tensor]:
    """Eager attention on the case's inputs; with upcast, in fp32 on the same (rounded) values."""
    if not upcast:
        return _outputs(eager_causal_attention_with_max_logits, name)

    def fp32_attention(q, k, v, scale):
        out, max_logit = eager_causal_attention_with_max_logits(q.float(), k.float(), v.float(), scale)
        return out.to(q.dtype), max_logit

    return _outputs(fp32_attention, name)


@pytest.mark.parametrize("name", FP32_CASES)
def test_fp32_matches_eager(kernel, name):
    got, want = kernel[name], _reference(name)
    for key in ("out", "dq", "dk", "dv"):
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert got["max_logit"].dtype == torch.float32 and not got["max_logit"].requires_grad
    # Only the dot products' summation order may differ.
    torch.testing.assert_close(got["max_logit"], want["max_logit"], rtol=1e-6, atol=1e-6)


def test_max_logit_is_exact_and_causal(kernel):
    """Exact dot products: the kernel's max logit equals the reference's, bit for bit."""
    got, want = kernel["fp32_dyadic"], _reference("fp32_dyadic")
    assert torch.equal(got["max_logit"], want["max_logit"]), (got["max_logit"], want["max_logit"])
    (q, k, _), _, scale = make_inputs("fp32_dyadic")
    unmasked_H = (q @ k.transpose(-1, -2) * scale).amax(dim=(0, 2, 3))
    # The case can catch a kernel that lets queries see later keys, or that counts padded rows.
    assert unmasked_H[0] > want["max_logit"][0] and want["max_logit"][1] < 0


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_within_eager_error(kernel, name):
    """Against fp32 attention on the same rounded inputs, the kernel (fp32 scores and accumulation)
    is at least about as close as eager attention in the same dtype."""
    got, exact, eager = kernel[name], _reference(name, upcast=True), _reference(name)
    for key in ("out", "dq", "dk", "dv"):
        assert got[key].dtype == exact[key].dtype, key
        kernel_err = (got[key].float() - exact[key].float()).abs().max().item()
        eager_err = (eager[key].float() - exact[key].float()).abs().max().item()
        assert kernel_err <= 2 * eager_err + 1e-3, (key, kernel_err, eager_err)
    # The scores are fp32 dot products of the rounded inputs, as in the fp32 reference.
    torch.testing.assert_close(got["max_logit"], exact["max_logit"], rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_problem(kernel):
    shape_error, dtype_error, rank_error = kernel["errors"]
    assert "k of q's shape" in shape_error and "(1, 1, 8, 16)" in shape_error
    assert "torch.float64" in dtype_error
    assert "(2, 8, 16)" in rank_error


def test_cpu_dispatch_is_the_eager_reference():
    """Off CUDA the model's attention is the eager path (the kernel is chosen by device only)."""
    (q, k, v), _, scale = make_inputs("fp32_mla_views")
    out, max_logit = causal_attention_with_max_logits(q, k, v, scale)
    want_out, want_max = eager_causal_attention_with_max_logits(q, k, v, scale)
    assert torch.equal(out, want_out) and torch.equal(max_logit, want_max)


if __name__ == "__main__":
    _run_kernels(sys.argv[1])
