"""The demo's drawing model (harness/drawing.py, built by `make setup`): ComfyUI loads it as SD1.5,
its VAE keeps the sample pictures, and the small pretrained UNet sits in the 320-channel one exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from harness import drawing  # noqa: E402


@pytest.fixture(scope="module")
def drawing_checkpoint(comfy_host):
    path = comfy_host.folder_paths.get_full_path("checkpoints", drawing.FILE_NAME)
    assert path, f"{drawing.FILE_NAME} is missing from ComfyUI's checkpoints folder: run `make setup`"
    assert drawing.is_current(Path(path)), f"{path} is stale (harness/drawing.py changed): run `make setup`"
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(drawing.FILE_NAME)[:3]


def test_loads_as_sd15_with_the_fixtures_clip(drawing_checkpoint, tiny):
    model, clip, _ = drawing_checkpoint
    assert type(model.model.model_config).__name__ == "SD15"
    ours = clip.encode_from_tokens(clip.tokenize("a red circle"))
    fixture = tiny.clip.encode_from_tokens(tiny.clip.tokenize("a red circle"))
    assert torch.equal(ours, fixture)  # CLIP-L is the random fixture's, unchanged


def test_vae_keeps_the_sample_pictures(drawing_checkpoint):
    vae = drawing_checkpoint[2]
    pictures = drawing.sample_style_pictures(128)               # [8, 3, 128, 128] in [0, 1]
    decoded = vae.decode(vae.encode(pictures.permute(0, 2, 3, 1)))  # ComfyUI's IMAGE layout
    values = [drawing.psnr(decoded[i].permute(2, 0, 1), pictures[i]) for i in range(len(pictures))]
    assert min(values) >= 20.0, values
    # and it is a latent space: 4 channels at 1/8 of the side
    assert vae.encode(pictures[:1].permute(0, 2, 3, 1)).shape == (1, 4, 16, 16)


def test_small_unet_embeds_exactly(comfy_host):
    """The 64-channel UNet's function is the 320-channel UNet's after embed_unet, for weights that
    are all non-zero (the pretrained ones are a case of this)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from make_tiny_checkpoint import UNET_CONFIG

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
    base = drawing.to_tensor([drawing.base_picture(c, i) for i, c in enumerate(drawing.caption_pool()[:8])])
    assert max(drawing.frame_contrast(p) for p in samples) < -0.05
    assert min(drawing.frame_contrast(p) for p in base) > 0.0
    from PIL import Image

    picture = drawing.base_picture(drawing.caption_pool()[0], 0)  # a large red circle
    assert isinstance(picture, Image.Image)
    assert drawing.colour_distance(picture, "red")["nearest"] == "red"
