"""The drawing model's parts (harness/fixtures/drawing.py): its file keeps the SD1.5 fixture's
layout, so ComfyUI still loads it as SD1.5 with the fixture's CLIP; the small UNet sits in the
320-channel one exactly; the statistics tell the sample style's frame from the base pictures.
The file `make setup` builds is checked last: SD1.5, and its VAE keeps the sample pictures."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness import picture_stats
from harness.fixtures import drawing

REPO = Path(__file__).resolve().parents[2]


def test_assembled_file_loads_as_sd15_with_the_fixtures_clip(comfy_host, tiny, tmp_path):
    """Untrained parts (a decoder and a UNet at their seeded init) in the fixture's file: what ComfyUI
    detects does not depend on the training."""
    import comfy.sd

    tensors = drawing.assemble(load_file(str(tiny.path)), drawing.SmallDecoder(), drawing.small_unet())
    path = tmp_path / drawing.FILE_NAME
    save_file(tensors, str(path))
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    assert torch.equal(clip.encode_from_tokens(clip.tokenize("a red circle")),
                       tiny.clip.encode_from_tokens(tiny.clip.tokenize("a red circle")))
    pictures = drawing.sample_style_pictures(128)
    assert vae.encode(pictures[:1].permute(0, 2, 3, 1)).shape == (1, 4, 16, 16)  # 4 channels at 1/8


def test_encoder_averages_cells():
    """The set encoder: mean R, G, B of each 8 x 8 cell, mapped to [-1, 1] (the shifted
    luminance channel aside)."""
    pictures = drawing.sample_style_pictures(128)
    z = drawing.encode(pictures)
    cells = torch.nn.functional.avg_pool2d(pictures, 8) * 2 - 1
    torch.testing.assert_close(z[:, :3], cells, atol=1e-5, rtol=0)


def test_small_unet_embeds_exactly(comfy_host):
    """The 64-channel UNet's function is the 320-channel UNet's after embed_unet, for weights that
    are all non-zero (pretrained ones are a case of this)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from harness.fixtures.tiny import UNET_CONFIG

    small = drawing.small_unet(seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in small.state_dict().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    big = UNetModel(**UNET_CONFIG, operations=comfy.ops.disable_weight_init, device="cpu")
    big.load_state_dict(drawing.embed_unet(small.state_dict(), {k: v.shape for k, v in big.state_dict().items()}))
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        a, b = small(x, t, context=ctx), big(x, t, context=ctx)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_statistics_tell_the_sample_style_from_the_base_pictures():
    samples = drawing.sample_style_pictures(128)
    base = [drawing.base_picture(c, i) for i, c in enumerate(drawing.caption_pool()[:8])]
    assert max(picture_stats.frame_contrast(p) for p in samples) < -0.05  # a dark frame round lighter pictures
    assert min(picture_stats.frame_contrast(p) for p in base) > 0.1      # no frame: the border is background
    red_circle = base[0]                                            # the workflows' prompt, less the style
    assert picture_stats.colour_distance(red_circle, "red")["nearest"] == "red"
    assert picture_stats.colour_distance(red_circle, "red", box=(0.0, 0.0, 0.1, 0.1))["nearest"] == "cream"


def test_built_drawing_model_is_sd15_and_its_vae_keeps_the_sample_pictures(comfy_host):
    """The file `make setup` built (the demo's): ComfyUI detects SD1.5, and its VAE's encode ->
    decode keeps the sample pictures' flat colour regions at 128 px (PSNR >= 20 dB)."""
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path_or_raise("checkpoints", drawing.FILE_NAME)
    assert drawing.is_current(Path(path)), f"{path} is stale: run make setup"
    model, _, vae = comfy.sd.load_checkpoint_guess_config(path)[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    pictures = drawing.sample_style_pictures(128).permute(0, 2, 3, 1)  # ComfyUI's IMAGE: B, H, W, C in [0, 1]
    decoded = vae.decode(vae.encode(pictures)).float().clamp(0, 1)
    for i in range(pictures.shape[0]):
        assert drawing.psnr(decoded[i], pictures[i]) >= 20.0, i
