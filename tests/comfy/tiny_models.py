"""The tiny model of each family, as tests need it: `tiny_model("flux-dev")`.

Files are built on first use into the running ComfyUI's model folders (folder_paths) by
harness/fixtures/tiny.py, whose FAMILIES table is the one list of families, and loaded
the way a user loads them: CheckpointLoaderSimple (SD1.5), UNETLoader (every family whose file
ComfyUI detects as it is), or the family's own ComfyUI model config where 0.3.75's detection
fixes a width the fixture shrinks (see that script's docstring). Import it after conftest has
imported ComfyUI."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.fixtures import tiny as fixtures

FAMILIES = fixtures.FAMILIES
Family = fixtures.Family


@dataclass
class TinyModel:
    """One family's fixture, loaded. model: its ComfyUI ModelPatcher (shared: clone before
    patching it); clip and vae: only the SD1.5 checkpoint has them."""
    family: Family
    path: Path
    model: object
    clip: object = None
    vae: object = None

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def objective(self) -> str:
        """"eps", "v" or "flow": what ComfyUI's model_sampling makes this model predict."""
        return self.family.objective

    def latent_shape(self, batch: int = 1, scale: int = 1) -> tuple[int, ...]:
        """[B, C, H, W] (or [B, C, T, H, W] for video), H and W times scale."""
        *lead, h, w = self.family.latent
        return (batch, *lead, h * scale, w * scale)

    def latent(self, batch: int = 1, seed: int = 0, scale: int = 1) -> dict:
        """A LATENT of random samples in the family's shape, fixed by seed."""
        generator = torch.Generator().manual_seed(seed)
        return {"samples": torch.randn(self.latent_shape(batch, scale), generator=generator)}

    def conditioning(self, seed: int = 0, tokens: int = 16) -> list:
        """A CONDITIONING as the family's text encoders give it (random values in their widths:
        the text encoders are not part of the fixture), fixed by seed."""
        generator = torch.Generator().manual_seed(seed)
        width, pooled = self.family.context
        extras = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=generator)}
        return [[torch.randn(1, tokens, width, generator=generator), extras]]


@functools.cache
def tiny_model(name: str) -> TinyModel:
    """The named family's fixture (a FAMILIES key), built if missing or stale, loaded once per session."""
    import nodes

    family = FAMILIES[name]
    path = fixtures.ensure(name)
    if family.checkpoint:
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
        return TinyModel(family, path, model, clip, vae)
    if family.full_width is None:
        return TinyModel(family, path, nodes.UNETLoader().load_unet(path.name, "default")[0])
    return TinyModel(family, path, load_with_config(family, path))


def load_with_config(family: Family, path: Path, dtype: torch.dtype | None = None):
    """A ModelPatcher of the file's weights in the family's own ComfyUI model (what
    comfy.sd.load_diffusion_model_state_dict does once detection has found the config), stored in
    ``dtype`` (its model_options "dtype": UNETLoader's weight_dtype) where given."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    config = fixtures.model_config(family)
    if dtype is not None:
        config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(),
                                                                config.supported_inference_dtypes))
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def stored_as(name: str, dtype: torch.dtype):
    """A fresh ModelPatcher of the named family's fixture with its diffusion model's weights stored
    in ``dtype`` (float8, fp16 ...), loaded by ComfyUI's own path: UNETLoader's (load_diffusion_model
    with model_options "dtype", which reads the SD1.5 checkpoint's UNet too), or for the families
    whose width 0.3.75 fixes, the same steps on the family's config."""
    import comfy.sd

    family, path = FAMILIES[name], fixtures.ensure(name)
    if family.full_width is not None:
        return load_with_config(family, path, dtype)
    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})


def upcast_copy(name: str, stored):
    """The named family's fixture loaded in float32 with the weights of ``stored`` (a stored_as model)
    cast up exactly: the same numbers in float32, the plain run a quantized base is compared with."""
    model = stored_as(name, torch.float32)
    values = stored.model.diffusion_model.state_dict()
    with torch.no_grad():
        for key, tensor in model.model.diffusion_model.state_dict().items():
            tensor.copy_(values[key].to(tensor.dtype))
    return model
