"""GPTQ's Hessian factor (one in-place chain, the same bits as before), its sharing, and the float-output target
(``cross``): plain GPTQ when the inputs agree, a lower error to the float outputs when they do not."""

from __future__ import annotations

import pytest
import torch

from hf_compress.quantization.algorithms import QuantizedWeight, _least_squares, _storable
from hf_compress.quantization.config import ModuleSpec
from hf_compress.quantization.gptq import HessianFactor, gptq_weight, hessian_factor, shared_factors
from hf_compress.quantization.packing import qrange


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_gptq(weight, hessian, spec, damp, dtype):
    """`gptq_weight` as it was before the in-place factor (commit 32347d9), kept to pin the results bit for bit."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    lo, hi = qrange(spec.bits)
    g = spec.group_size
    scales = torch.empty(rows, cols // g)
    zeros = None if spec.symmetric else torch.empty(rows, cols // g)
    q_all = torch.empty(rows, cols, dtype=torch.int8)
    scale = zero = None
    for start in range(0, cols, 128):
        end = min(start + 128, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            col = start + j
            if col % g == 0:
                group = torch.cat((block[:, j:], w[:, end:]), 1)[:, :g] if col + g > end else block[:, j : j + g]
                s, z = _least_squares(group.reshape(rows, 1, g), spec.bits, spec.symmetric)
                s, z = _storable(s, z, dtype)
                scale, zero = s.float().reshape(rows), None if z is None else z.float().reshape(rows)
                scales[:, col // g] = scale
                if zeros is not None:
                    zeros[:, col // g] = zero
            x = block[:, j]
            q = torch.clamp(torch.round((x if zero is None else x - zero) / scale), lo, hi)
            q_all[:, col] = q.to(torch.int8)
            rec = q * scale if zero is None else q * scale + zero
            err = (x - rec) / hinv[col, col]
            block[:, j:] -= err.unsqueeze(1) * hinv[col, col:end].unsqueeze(0)
            errors[:, j] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return QuantizedWeight(q_all, scales.to(dtype), None if zeros is None else zeros.to(dtype))


def _layer(rows=48, cols=320, tokens=600, seed=0, dead=(3, 200)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (
        torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    )
    x[:, list(dead)] = 0  # inputs that never fire
    weight = torch.randn(rows, cols, generator=g) / cols**0.5
    return weight, x


def _equal(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    same_zero = (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
    return torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and same_zero


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(4, 32, False), (4, 64, True), (8, 320, False)])
def test_same_bits_as_before(bits, group, symmetric):
    weight, x = _layer()
    hessian = x.t() @ x / x.shape[0]
    spec = ModuleSpec(kind="linear", bits=bits, group_size=group, symmetric=symmetric)
    expected = _reference_gptq(weight, hessian, spec, 0.01, torch.float16)
    copy = hessian.clone()
    assert _equal(gptq_weight(weight, hessian, spec, 0.01, torch.float16, "w"), expected)
    assert torch.equal(hessian, copy)  # a Hessian passed in is not consumed
    factor = hessian_factor(hessian.clone(), 0.01, overwrite=True)  # the in-place chain, reused for two blocks
    top = gptq_weight(weight[:20], factor, spec, 0.01, torch.float16, "w")
    bottom = gptq_weight(weight[20:], factor, spec, 0.01, torch.float16, "w")
    whole = QuantizedWeight(torch.cat([top.q, bottom.q]), torch.cat([top.scale, bottom.scale]),
                            None if top.zero is None else torch.cat([top.zero, bottom.zero]))  # fmt: skip
    assert _equal(whole, expected)


def test_factor_in_place_and_inverse():
    _, x = _layer(cols=200, dead=(3,))
    hessian = x.t() @ x / x.shape[0]
    damped = hessian.clone()
    damped[3, 3] = 1
    damped.diagonal().add_(0.01 * torch.diag(damped).mean())
    storage = hessian.data_ptr()
    factor = hessian_factor(hessian, 0.01, overwrite=True)
    assert factor.upper.data_ptr() == storage and factor.upper.is_contiguous()  # no second full-size buffer kept
    assert torch.equal(factor.upper, factor.upper.triu()) and factor.dead.nonzero().flatten().tolist() == [3]
    torch.testing.assert_close(factor.upper.t() @ factor.upper, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_shared_inputs_share_one_factor():
    _, x = _layer(cols=64, dead=())
    shared, alone = x.t() @ x, (x[:, :32].t() @ x[:, :32])
    hessians = {"q": shared, "k": shared, "o": alone, "v": shared}
    factors = list(shared_factors(["q", "k", "o", "v"], hessians, 0.01))
    assert hessians == {} and [n for n, _ in factors] == ["q", "k", "o", "v"]
    assert factors[0][1] is factors[1][1] is factors[3][1] and factors[2][1] is not factors[0][1]
    assert isinstance(factors[2][1], HessianFactor) and factors[2][1].upper.shape == (32, 32)


def test_zero_cross_moment_is_plain_gptq():
    weight, x = _layer()
    hessian = x.t() @ x / x.shape[0]
    spec = ModuleSpec(kind="linear", bits=4, group_size=32, symmetric=False)
    plain = gptq_weight(weight, hessian, spec, 0.01, torch.float16, "w")
    assert _equal(gptq_weight(weight, hessian, spec, 0.01, torch.float16, "w", cross=torch.zeros_like(hessian)), plain)
    with pytest.raises(ValueError, match="cross moment"):
        gptq_weight(weight, hessian, spec, 0.01, torch.float16, "w", cross=torch.zeros(3, 3))


def _dequantized(qw: QuantizedWeight, group: int) -> torch.Tensor:
    scale = qw.scale.float().repeat_interleave(group, 1)
    zero = 0 if qw.zero is None else qw.zero.float().repeat_interleave(group, 1)
    return qw.q.float() * scale + zero


def test_float_target_lowers_the_error_to_float_outputs():
    """The quantized stream's inputs drift from the float model's (``X_q = X_f A + noise``): GPTQ with the cross moment
    fits ``X_f W^T`` from ``X_q``, plain GPTQ only ``X_q W^T``."""
    weight, x_float = _layer(rows=64, cols=256, tokens=4000, dead=())
    g = torch.Generator().manual_seed(1)
    drift = torch.eye(256) + 0.2 * torch.randn(256, 256, generator=g) / 256**0.5
    x_quant = x_float @ drift + 0.02 * torch.randn(x_float.shape, generator=g)
    n = x_float.shape[0]
    hessian, cross = x_quant.t() @ x_quant / n, (x_float - x_quant).t() @ x_quant / n
    spec = ModuleSpec(kind="linear", bits=4, group_size=32, symmetric=False)
    target = x_float @ weight.t()
    errors = {}
    for name, d in (("plain", None), ("float target", cross)):
        qw = gptq_weight(weight, hessian, spec, 0.01, torch.float32, "w", cross=d)
        errors[name] = (target - x_quant @ _dequantized(qw, 32).t()).norm().item()
    best_float = torch.linalg.lstsq(x_quant, target).solution.t()  # the best any float weight can do on X_q
    floor = (target - x_quant @ best_float.t()).norm().item()
    assert errors["float target"] < 0.5 * errors["plain"], errors  # measured: 38 against 112
    assert errors["float target"] > floor, (errors, floor)
