from __future__ import annotations

import pytest
import torch
from core_helpers import random_layer, reference_delta, rel_error

from trilora_core import TriLoRALayer


def test_properties_linear() -> None:
    layer = random_layer(out=6, in_features=5, kernel=(), rank=3, seed=0, alpha=6.0)
    assert layer.rank == 3
    assert layer.out_features == 6
    assert layer.weight_shape == (6, 5)
    assert layer.scale == 2.0
    assert layer.delta().shape == (6, 5)


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (2, 1, 3)])
def test_properties_conv(kernel: tuple[int, ...]) -> None:
    layer = random_layer(out=4, in_features=2, kernel=kernel, rank=3, seed=1)
    assert layer.weight_shape == (4, 2, *kernel)
    assert layer.delta().shape == (4, 2, *kernel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_delta_computes_in_float32_and_casts(dtype: torch.dtype) -> None:
    layer = random_layer(out=7, in_features=3, kernel=(3, 3), rank=4, seed=2, dtype=dtype)
    delta = layer.delta()
    assert delta.dtype == torch.float32
    assert rel_error(delta, reference_delta(layer)) < 1e-6
    assert layer.delta(dtype=torch.float16).dtype == torch.float16


def test_delta_is_differentiable() -> None:
    layer = random_layer(out=3, in_features=4, kernel=(), rank=2, seed=3)
    for t in (layer.u, layer.s, layer.vt):
        t.requires_grad_(True)
    layer.delta().sum().backward()
    assert all(t.grad is not None for t in (layer.u, layer.s, layer.vt))


def test_to_returns_new_layer() -> None:
    layer = random_layer(out=3, in_features=4, kernel=(), rank=2, seed=4, alpha=5.0)
    half = layer.to(dtype=torch.float16)
    assert half is not layer
    assert half.u.dtype == half.s.dtype == half.vt.dtype == torch.float16
    assert layer.u.dtype == torch.float32
    assert half.alpha == 5.0


@pytest.mark.parametrize(
    ("u", "s", "vt", "message"),
    [
        ((3,), (2,), (2, 4), "TriLoRALayer.u must be [out, rank], got shape [3]"),
        ((3, 2), (2, 1), (2, 4), "TriLoRALayer.s must be [rank], got shape [2, 1]"),
        ((3, 2), (2,), (2,), "TriLoRALayer.vt must be [rank, in] or [rank, in, *kernel], got shape [2]"),
        ((3, 0), (0,), (0, 4), "TriLoRALayer rank must be at least 1"),
        ((3, 2), (3,), (2, 4), "TriLoRALayer ranks disagree: u [3, 2], s [3], vt [2, 4]"),
    ],
)
def test_invalid_shapes(u, s, vt, message: str) -> None:
    with pytest.raises(ValueError) as err:
        TriLoRALayer(u=torch.zeros(u), s=torch.zeros(s), vt=torch.zeros(vt), alpha=1.0)
    assert str(err.value) == message


def test_invalid_dtype_and_alpha() -> None:
    with pytest.raises(ValueError) as err:
        TriLoRALayer(u=torch.zeros(3, 2, dtype=torch.int64), s=torch.zeros(2), vt=torch.zeros(2, 4), alpha=1.0)
    assert str(err.value) == "TriLoRALayer.u must be a floating-point tensor"
    with pytest.raises(ValueError) as err:
        TriLoRALayer(u=torch.zeros(3, 2), s=torch.zeros(2), vt=torch.zeros(2, 4), alpha=float("nan"))
    assert str(err.value) == "TriLoRALayer alpha must be finite, got nan"
