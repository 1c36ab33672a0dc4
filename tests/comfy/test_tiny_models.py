"""Each family's tiny fixture is what ComfyUI takes it for: detected as its family, with its own
objective, every weight loaded from the file, and one sampling step runs on its latents."""
from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, fixtures, tiny_model

OBJECTIVES = {"EPS": "eps", "V_PREDICTION": "v", "FLOW": "flow", "FLUX": "flow"}  # FLUX: flow, resolution-shifted


@pytest.mark.parametrize("name", list(FAMILIES))
def test_comfyui_detects_the_fixture_as_its_family(comfy_host, name):
    import comfy.model_detection
    import comfy.utils

    family = FAMILIES[name]
    tiny = tiny_model(name)
    sd = comfy.utils.load_torch_file(str(tiny.path))
    if family.full_width is None:
        prefix = comfy.model_detection.unet_prefix_from_state_dict(sd) if family.checkpoint else ""
        detected = comfy.model_detection.model_config_from_unet(sd, prefix)
    else:
        # 0.3.75 fixes this family's width: the same layout at full width is what it detects.
        full = {k: torch.empty(shape, device="meta")
                for k, shape in fixtures.diffusion_model_shapes(family, full_width=True).items()}
        assert full.keys() == sd.keys()
        detected = comfy.model_detection.model_config_from_unet(full, "")
    assert type(detected).__name__ == family.model_class
    assert type(tiny.model.model.model_config).__name__ == family.model_class
    assert OBJECTIVES[tiny.model.model.model_type.name] == family.objective


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if not family.checkpoint])
def test_every_weight_comes_from_the_file_built_from_its_seed(comfy_host, name):
    """(The SD1.5 checkpoint's bytes are checked by test_host.)"""
    tiny = tiny_model(name)
    assert tiny.path.stat().st_size < 110e6
    built = {k: v for k, v in fixtures.build(family=name).items() if k not in tiny.family.extra_keys}
    weights = tiny.model.model.diffusion_model.state_dict()
    assert weights.keys() == built.keys()
    for key, value in built.items():
        assert torch.equal(weights[key].float(), value.float()), key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_sampling_step_runs_on_the_family_latents(comfy_host, name):
    nodes = comfy_host.nodes
    tiny = tiny_model(name)
    latent = {"samples": torch.zeros(tiny.latent_shape())}
    out = nodes.KSampler().sample(tiny.model, 1, 1, 1.0, "euler", "simple", tiny.conditioning(0),
                                  tiny.conditioning(1), latent)[0]["samples"]
    assert out.shape == tiny.latent_shape()
    assert torch.isfinite(out).all() and out.abs().sum() > 0
