"""The weight adapter's contract with ComfyUI beyond what 0.3.75 calls: bypass mode's h()/g()
(newer releases), the rebuild as type(a)(a.loaded_keys, a.weights), half-precision patching,
and the trainable module ComfyUI's own trainer gets from create_train, through to a file saved by
ComfyUI's Save LoRA and loaded by Load TriLoRA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_node


@pytest.fixture
def adapter_module(comfy_host):
    return __import__(comfy_host.pack.__name__ + ".nodes.adapter", fromlist=["TriLoRAAdapter"])


def random_layer(core, out, in_shape, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return core.TriLoRALayer(torch.randn(out, rank, generator=g), torch.rand(rank, generator=g) + 0.1,
                             torch.randn(rank, *in_shape, generator=g), 2.0)


def merged(adapter, weight, strength=1.0, dtype=torch.float32):
    return adapter.calculate_weight(weight.clone(), "k", strength, 1.0, None, lambda a: a, dtype)


@pytest.mark.parametrize("conv", [False, True])
def test_bypass_h_equals_the_merged_weight(comfy_host, adapter_module, conv):
    core = comfy_host.core
    g = torch.Generator().manual_seed(1)
    if conv:
        layer = random_layer(core, 6, (5, 3, 3))
        weight, x = torch.randn(6, 5, 3, 3, generator=g), torch.randn(2, 5, 9, 9, generator=g)
        kw = {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
        forward = lambda w: F.conv2d(x, w, **kw)  # noqa: E731
    else:
        layer = random_layer(core, 6, (5,))
        weight, x = torch.randn(6, 5, generator=g), torch.randn(2, 7, 5, generator=g)
        kw = {}
        forward = lambda w: F.linear(x, w)  # noqa: E731
    for cls in (adapter_module.TriLoRAAdapter, None):
        adapter = adapter_module.TriLoRAAdapter.from_layer(layer)
        if cls is None:  # the trainable module has the same bypass contract
            adapter = adapter.to_train()
        adapter.multiplier, adapter.is_conv, adapter.conv_dim, adapter.kw_dict = 0.7, conv, 2 if conv else 0, kw
        base = forward(weight)
        out = adapter.g(base + adapter.h(x, base))
        want = forward(merged(adapter_module.TriLoRAAdapter.from_layer(layer), weight, 0.7))
        torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)


def test_rebuilt_adapter_patches_the_same(comfy_host, adapter_module):
    layer = random_layer(comfy_host.core, 8, (4,))
    adapter = adapter_module.TriLoRAAdapter.from_layer(layer)
    rebuilt = type(adapter)(adapter.loaded_keys, adapter.weights)  # what dynamic VRAM does
    weight = torch.randn(8, 4)
    assert torch.equal(merged(adapter, weight), merged(rebuilt, weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_patching_stays_within_half_rounding(comfy_host, adapter_module, dtype):
    # Newer ComfyUI patches in the compute dtype; a large alpha/r must not overflow fp16.
    core = comfy_host.core
    layer = core.TriLoRALayer(torch.linalg.qr(torch.randn(64, 4))[0], torch.tensor([3e4, 2e4, 1e4, 5e3]),
                              torch.linalg.qr(torch.randn(32, 4))[0].T.contiguous(), 1e-3)
    adapter = adapter_module.TriLoRAAdapter.from_layer(layer)
    weight = torch.randn(64, 32)
    want = weight + layer.delta()
    got = merged(adapter, weight.to(dtype), dtype=dtype).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_create_train_starts_from_the_unchanged_weight_and_learns(comfy_host, adapter_module):
    weight = torch.randn(16, 8)
    torch.manual_seed(0)  # ComfyUI's trainer seeds the global generator
    train = adapter_module.TriLoRAAdapter.create_train(weight, rank=4, alpha=1.0)
    assert torch.equal(train(weight), weight)
    torch.manual_seed(0)
    again = adapter_module.TriLoRAAdapter.create_train(weight, rank=4, alpha=1.0)
    assert torch.equal(train.trilora_u, again.trilora_u)
    target = weight + 0.1
    opt = torch.optim.Adam(train.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        loss = (train(weight) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5


def trained_lora_weights(result) -> dict:
    """The LoRA state dict among TrainLoraNode's outputs: 0.3.75 returns (MODEL, LORA_MODEL,
    LOSS_MAP, steps), 0.33 (LORA_MODEL, LOSS_MAP, steps)."""
    return next(r for r in result if isinstance(r, dict) and r and all(isinstance(v, torch.Tensor) for v in r.values()))


def test_comfyui_trainer_with_trilora_then_comfyui_save_lora_then_load_trilora(comfy_host, tiny):
    # A user picks TriLoRA as TrainLoraNode's algorithm, saves with ComfyUI's Save LoRA (safetensors
    # refuses non-contiguous tensors: LAPACK's column-major Q), and loads the file with Load TriLoRA.
    import comfy.sd
    from comfy_extras.nodes_train import SaveLoRA, TrainLoraNode

    nodes = comfy_host.nodes
    with torch.inference_mode():
        latents = [nodes.VAEEncode().encode(tiny.vae, torch.full((1, 64, 64, 3), v))[0] for v in (0.3, 0.6)]
        conds = [nodes.CLIPTextEncode().encode(tiny.clip, c)[0] for c in ("a dark square", "a light square")]
    torch.manual_seed(0)  # TrainLoraNode draws its initialisation from the global generator
    inputs = {i.id: [i.default] for i in TrainLoraNode.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}
    inputs.update(model=[tiny.model], latents=latents, positive=conds, steps=[2], learning_rate=[1e-2], rank=[4],
                  algorithm=["TriLoRA"], training_dtype=["fp32"], lora_dtype=["fp32"], existing_lora=["[None]"],
                  gradient_checkpointing=[False])
    with torch.inference_mode():
        lora = trained_lora_weights(TrainLoraNode.execute(**inputs).result)
        SaveLoRA.execute(lora=lora, prefix="loras/core_trilora", steps=2)
    saved = sorted((comfy_host.output / "loras").glob("core_trilora_2_steps_*.safetensors"))[-1]
    us = [k for k in lora if k.endswith(".trilora_u")]
    assert len(us) == 69 and all(lora[k].is_contiguous() for k in lora)
    (comfy_host.loras / "core_trainer").mkdir(exist_ok=True)
    (comfy_host.loras / "core_trainer" / saved.name).write_bytes(saved.read_bytes())  # into models/loras

    with torch.inference_mode():
        loaded = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model,
                          trilora_name=f"core_trainer/{saved.name}", strength_model=1.0)[0]
        core = comfy.sd.load_lora_for_models(tiny.model, None, lora, 1.0, 0)[0]  # ComfyUI applying the dict
    base, got, want = (patched(m) for m in (tiny.model, loaded, core))
    changed = [k for k in base if not torch.equal(base[k], want[k])]
    assert len(changed) > 69  # the TriLoRA layers and TrainLoraNode's norm and bias diffs
    for key in base:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    patched(tiny.model)  # leave the shared model unpatched


def patched(model) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
