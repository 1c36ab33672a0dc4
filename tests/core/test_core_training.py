from __future__ import annotations

import math

import pytest
import torch
from core_helpers import max_orthonormality_error

from trilora_core import init_layer, lr_lambda, orthogonality_penalty


@pytest.mark.parametrize("shape", [(8, 6), (16, 4, 3, 3), (5, 3, 7), (4, 2, 1, 2, 3)])
def test_init_layer(shape: tuple[int, ...]) -> None:
    layer = init_layer(shape, rank=3, generator=torch.Generator().manual_seed(7))
    assert layer.weight_shape == shape
    assert layer.rank == 3
    assert layer.alpha == 3.0
    assert torch.equal(layer.s, torch.zeros(3))
    assert torch.count_nonzero(layer.delta()) == 0
    assert max_orthonormality_error(layer) < 1e-6


def test_init_layer_same_seed_same_tensors() -> None:
    a = init_layer((12, 5, 3, 3), 4, torch.Generator().manual_seed(123))
    b = init_layer((12, 5, 3, 3), 4, torch.Generator().manual_seed(123))
    c = init_layer((12, 5, 3, 3), 4, torch.Generator().manual_seed(124))
    assert torch.equal(a.u, b.u) and torch.equal(a.vt, b.vt) and torch.equal(a.s, b.s)
    assert not torch.equal(a.u, c.u)


def test_init_layer_options() -> None:
    layer = init_layer((6, 5), 4, torch.Generator().manual_seed(0), alpha=8.0, s_init=0.5, dtype=torch.bfloat16)
    assert layer.u.dtype == layer.s.dtype == layer.vt.dtype == torch.bfloat16
    assert layer.alpha == 8.0
    assert torch.equal(layer.s, torch.full((4,), 0.5, dtype=torch.bfloat16))
    assert layer.u.device.type == "cpu"


def test_init_layer_clips_rank_and_keeps_scale() -> None:
    layer = init_layer((3, 10), 8, torch.Generator().manual_seed(0), alpha=16.0)
    assert layer.rank == 3
    assert layer.scale == 2.0  # alpha / rank as asked: 16 / 8
    assert layer.alpha == 6.0


@pytest.mark.parametrize(
    ("shape", "rank", "message"),
    [
        ((5,), 2, "init_layer: weight_shape must have at least 2 dimensions, got (5,)"),
        ((5, 4), 0, "init_layer: rank must be a positive integer, got 0"),
        ((0, 4), 2, "init_layer: weight_shape has a zero-sized dimension: (0, 4)"),
    ],
)
def test_init_layer_invalid(shape, rank: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        init_layer(shape, rank, torch.Generator().manual_seed(0))
    assert str(err.value) == message


def test_orthogonality_penalty() -> None:
    layer = init_layer((10, 4, 3, 3), 5, torch.Generator().manual_seed(1))
    assert orthogonality_penalty(layer.u, layer.vt).item() < 1e-5
    u = (layer.u * 2).requires_grad_(True)
    vt = layer.vt.clone().requires_grad_(True)
    penalty = orthogonality_penalty(u, vt)
    assert penalty.dtype == torch.float32
    # U^T U = 4 I: ||3 I||_F = 3 sqrt(5); V is orthonormal.
    assert math.isclose(penalty.item(), 3 * math.sqrt(5), rel_tol=1e-5)
    penalty.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert vt.grad is not None


def test_orthogonality_penalty_half_inputs() -> None:
    layer = init_layer((6, 6), 3, torch.Generator().manual_seed(2), dtype=torch.float16)
    assert orthogonality_penalty(layer.u, layer.vt).dtype == torch.float32


def test_lr_schedules() -> None:
    constant = lr_lambda("constant", total_steps=100, warmup_steps=10)
    linear = lr_lambda("linear", total_steps=100, warmup_steps=10)
    cosine = lr_lambda("cosine", total_steps=100, warmup_steps=10)
    for f in (constant, linear, cosine):
        assert f(0) == 0.0
        assert f(5) == 0.5
        assert f(10) == 1.0
    assert constant(99) == 1.0
    assert linear(55) == 0.5
    assert linear(100) == 0.0
    assert linear(1000) == 0.0
    assert math.isclose(cosine(55), 0.5)
    assert math.isclose(cosine(100), 0.0, abs_tol=1e-12)
    assert lr_lambda("constant", 10, 0)(0) == 1.0


def test_lr_lambda_with_lambdalr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", 4, 2))
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_lr_lambda_invalid() -> None:
    with pytest.raises(ValueError) as err:
        lr_lambda("exponential", 10, 0)
    assert str(err.value) == (
        "unknown learning-rate schedule 'exponential'; expected one of 'constant', 'cosine', 'linear'"
    )
    with pytest.raises(ValueError) as err:
        lr_lambda("linear", 10, -1)
    assert str(err.value) == "lr_lambda: steps must not be negative, got total_steps=10, warmup_steps=-1"
