"""AdaLoRA's rank budget (arXiv 2303.10512, its RankAllocator): the cubic budget schedule, the
triplet importance from smoothed sensitivity and uncertainty, and the global top-b mask on s."""
from __future__ import annotations

import pytest
import torch

from trilora_core import RankBudget, rank_budget_schedule, top_directions


def test_the_cubic_schedule():
    # 100 steps, 40 directions to 10, t_init 10, t_final 30: span 60
    b = [rank_budget_schedule(t, 100, 40, 10, 10, 30) for t in range(100)]
    assert b[:10] == [40] * 10 and b[70:] == [10] * 30
    assert b[10] == 40 and b[40] == 10 + int(30 * 0.5 ** 3)  # halfway: (1 - 1/2)^3
    assert all(x >= y for x, y in zip(b, b[1:], strict=False))


def test_top_directions_keeps_the_most_important_over_all_layers():
    imp = {"b": torch.tensor([0.1, 5.0, 0.2]), "a": torch.tensor([3.0, 0.0])}
    kept = top_directions(imp, 2)
    assert kept["a"].tolist() == [1.0, 0.0] and kept["b"].tolist() == [0.0, 1.0, 0.0]
    # ties resolved the same way every time
    assert top_directions({"x": torch.zeros(3)}, 1)["x"].tolist() == [1.0, 0.0, 0.0]


def _layers(rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ("l0", "l1"):
        u = torch.randn(6, rank, generator=g).requires_grad_()
        s = torch.randn(rank, generator=g).requires_grad_()
        vt = torch.randn(rank, 5, generator=g).requires_grad_()
        layers[name] = (u, s, vt)
    return layers


def test_importance_is_adaloras_triplet_score_of_smoothed_sensitivity_times_uncertainty():
    layers = _layers()
    budget = RankBudget(layers, keep=0.5, total_steps=10)
    grads = []
    for _ in range(2):
        loss = sum(((u * s) @ vt).square().sum() for u, s, vt in layers.values())
        for p in (p for f in layers.values() for p in f):
            p.grad = None
        loss.backward()
        grads.append({n: [(p.detach() * p.grad).abs() for p in f] for n, f in layers.items()})
        budget.observe()
    i1, i2 = grads
    for name in layers:
        sens = [0.15 * 0.85 * a + 0.15 * b for a, b in zip(i1[name], i2[name], strict=True)]
        first = [0.15 * a for a in i1[name]]  # the smoothed sensitivity and uncertainty after step 1
        unc = [0.85 * f + 0.15 * (b - f).abs() for f, b in zip(first, i2[name], strict=True)]
        score = [a * b for a, b in zip(sens, unc, strict=True)]
        want = score[1] + score[0].mean(0) + score[2].mean(1)
        assert torch.allclose(budget.importance()[name], want, rtol=1e-5)


def test_apply_zeroes_s_outside_the_budget_on_the_schedule():
    layers = _layers()
    total = 20
    budget = RankBudget(layers, keep=0.25, total_steps=total, interval=5)  # 8 directions -> 2
    kept = []
    for step in range(total):
        loss = sum(((u * s) @ vt).square().sum() for u, s, vt in layers.values())
        for p in (p for f in layers.values() for p in f):
            p.grad = None
        loss.backward()
        budget.observe()
        before = {n: f[1].detach().clone() for n, f in layers.items()}
        b = budget.apply(step)
        nonzero = sum(int((f[1] != 0).sum()) for f in layers.values())
        kept.append((b, nonzero))
        if step < 2:  # t_init = 2: nothing pruned yet
            assert all(torch.equal(before[n], layers[n][1]) for n in layers)
    assert kept[0] == (8, 8)
    assert kept[-1] == (2, 2)  # the final budget, every step of the last 30 %
    assert all(nz <= b for b, nz in kept[14:])


def test_bad_keep_is_named():
    with pytest.raises(ValueError, match="keep must be in"):
        RankBudget(_layers(), keep=0.0, total_steps=10)
