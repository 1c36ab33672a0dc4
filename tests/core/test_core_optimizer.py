"""trilora_core.optimizer and trilora_core.training: per-factor learning rates, optimizers, losses, seeded streams and
optimizer state round trips (no ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from trilora_core import init_layer, training
from trilora_core import optimizer as topt


def _factors(shapes: dict[str, tuple[int, ...]], rank: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, shape in shapes.items():
        layer = init_layer(shape, rank, gen)
        out[prefix] = tuple(torch.nn.Parameter(t.clone()) for t in (layer.u, layer.s, layer.vt))
    return out


def test_s_learning_rate_follows_the_layer_size():
    # sqrt(out * in / rank): 320x320 at rank 8 -> sqrt(12800); a 3x3 conv counts in * 9.
    assert topt.s_learning_rate(1e-3, (320, 320), 8, 1.0) == pytest.approx(1e-3 * math.sqrt(12800))
    assert topt.s_learning_rate(1e-3, (320, 640, 3, 3), 8, 0.5) == pytest.approx(0.5e-3 * math.sqrt(320 * 5760 / 8))
    with pytest.raises(ValueError, match="rank must be at least 1"):
        topt.s_learning_rate(1e-3, (4, 4), 0, 1.0)


def test_s_step_changes_the_weight_by_about_lr_times_scale_per_entry():
    # The rule's promise: after one Adam step at s = 0, delta W has RMS entry ~ lr * scale * alpha / r.
    out, inn, rank, lr, scale = 256, 384, 8, 1e-3, 1.0
    layer = init_layer((out, inn), rank, torch.Generator().manual_seed(3))
    s = torch.nn.Parameter(layer.s.clone())
    opt = torch.optim.Adam([{"params": [s], "lr": topt.s_learning_rate(lr, (out, inn), rank, scale)}])
    s.grad = torch.randn(rank, generator=torch.Generator().manual_seed(4))
    opt.step()
    delta = (layer.u * s.detach()) @ layer.vt  # alpha / r = 1
    rms = delta.square().mean().sqrt().item()
    assert 0.5 * lr * scale < rms < 2 * lr * scale


def test_param_groups_put_u_v_at_the_learning_rate_and_s_apart_without_decay():
    shapes = {"b": (320, 320), "a": (320, 320), "c": (640, 320)}
    factors = _factors(shapes, 4)
    groups = topt.param_groups(factors, shapes, 1e-4, 2.0)
    assert groups[0]["lr"] == 1e-4 and "weight_decay" not in groups[0]
    assert groups[0]["names"] == ["a.trilora_u", "a.trilora_vt", "b.trilora_u", "b.trilora_vt",
                                  "c.trilora_u", "c.trilora_vt"]
    # a and b share one s group (same learning rate), c has its own; none decays.
    assert [g["names"] for g in groups[1:]] == [["a.trilora_s", "b.trilora_s"], ["c.trilora_s"]]
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])
    assert groups[1]["lr"] == pytest.approx(1e-4 * 2.0 * math.sqrt(320 * 320 / 4))
    assert all(g["base_lr"] == g["lr"] for g in groups)
    assert groups[1]["params"][0] is factors["a"][1]


@pytest.mark.parametrize("name", topt.OPTIMIZERS)
def test_make_optimizer_builds_each_choice(name):
    shapes = {"a": (8, 6)}
    opt = topt.make_optimizer(name, topt.param_groups(_factors(shapes, 2), shapes, 1e-3, 1.0))
    assert type(opt).__name__ == name
    with pytest.raises(ValueError, match="unknown optimizer 'Lion'"):
        topt.make_optimizer("Lion", [])


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_adam_optimizers_take_the_fused_kernel_with_the_same_updates(name):
    shapes = {"a": (8, 6), "b": (5, 3)}
    runs = []
    for fused in (True, False):
        factors = _factors(shapes, 2)
        params = [p for f in factors.values() for p in f]
        groups = topt.param_groups(factors, shapes, 1e-2, 1.0)
        opt = topt.make_optimizer(name, groups) if fused else getattr(torch.optim, name)(groups, lr=1e-2)
        assert bool(opt.defaults.get("fused")) == fused
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 2) + 1)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_functions():
    err = torch.tensor([0.5, -2.0])
    assert training.loss_function("MSE")(err).item() == pytest.approx((0.25 + 4.0) / 2)
    assert training.loss_function("L1")(err).item() == pytest.approx(1.25)
    assert training.loss_function("Huber")(err).item() == pytest.approx((0.125 + 1.5) / 2)
    assert training.loss_function("SmoothL1")(err).item() == pytest.approx((0.125 + 1.5) / 2)
    with pytest.raises(ValueError, match="unknown loss_function 'L3'"):
        training.loss_function("L3")


def test_derived_seeds_are_stable_and_distinct():
    assert training.derive_seed(0, "noise", 1, 0) == training.derive_seed(0, "noise", 1, 0)
    seeds = {training.derive_seed(s, "noise", k, 0) for s in range(3) for k in range(50)}
    assert len(seeds) == 150 and all(0 <= x < 2**63 for x in seeds)
    a = torch.randn(4, generator=training.generator(7, "init"))
    assert torch.equal(a, torch.randn(4, generator=training.generator(7, "init")))


def test_sample_indices_visit_every_item_once_per_epoch_and_resume_exactly():
    stream = training.sample_indices(5, 7, 0, 21)
    for epoch in range(3):
        assert sorted(stream[7 * epoch: 7 * epoch + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a new order each epoch
    # Any window equals the same slice of the whole stream (what resuming relies on).
    assert training.sample_indices(5, 7, 9, 6) == stream[9:15]
    assert training.sample_indices(6, 7, 0, 7) != stream[:7]


def test_all_finite():
    assert training.all_finite([torch.ones(3), None, torch.zeros(2, 2)])
    assert not training.all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not training.all_finite([torch.tensor([float("inf")])])
    assert training.all_finite([])


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("name", topt.OPTIMIZERS)
def test_optimizer_state_round_trip_continues_exactly(name):
    shapes = {"a": (6, 5), "b": (4, 3, 3, 3)}

    def build():
        factors = _factors(shapes, 2)
        groups = topt.param_groups(factors, shapes, 1e-2, 1.0)
        if name == "SGD":
            for g in groups:
                g["momentum"] = 0.9  # gives SGD a state to carry
        return [p for g in groups for p in g["params"]], topt.make_optimizer(name, groups)

    params_a, opt_a = build()
    _train(opt_a, params_a, 3, seed=1)
    tensors = topt.optimizer_state_tensors(opt_a)
    assert tensors and all(k.startswith("state.") for k in tensors)

    params_b, opt_b = build()
    with torch.no_grad():
        for a, b in zip(params_a, params_b, strict=True):
            b.copy_(a)
    topt.load_optimizer_state(opt_b, tensors)
    _train(opt_a, params_a, 2, seed=2)
    _train(opt_b, params_b, 2, seed=2)
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)


def test_load_optimizer_state_refuses_a_different_adapter():
    shapes = {"a": (6, 5)}
    groups = topt.param_groups(_factors(shapes, 2), shapes, 1e-2, 1.0)
    opt = topt.make_optimizer("Adam", groups)
    _train(opt, [p for g in groups for p in g["params"]], 1, seed=0)
    tensors = topt.optimizer_state_tensors(opt)

    other_shapes = {"z": (6, 5)}
    other = topt.make_optimizer("Adam", topt.param_groups(_factors(other_shapes, 2), other_shapes, 1e-2, 1.0))
    with pytest.raises(ValueError, match="does not match the adapter's parameters"):
        topt.load_optimizer_state(other, tensors)
    assert not other.state

    wrong = dict(tensors)
    wrong["state.a.trilora_u.exp_avg"] = torch.zeros(6, 3)
    fresh = topt.make_optimizer("Adam", topt.param_groups(_factors(shapes, 2), shapes, 1e-2, 1.0))
    with pytest.raises(ValueError, match=r"a.trilora_u.exp_avg has shape \[6, 3\]"):
        topt.load_optimizer_state(fresh, wrong)
    assert not fresh.state
