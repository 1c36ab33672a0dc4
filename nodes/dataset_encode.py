"""Encode Training Dataset (TriLoRA): images and captions to the LATENT and CONDITIONING lists
that Train TriLoRA takes, as ComfyUI 0.33's Make Training Dataset outputs them, encoded once and
kept in a cache file (dataset_cache.py)."""
from __future__ import annotations

from comfy_api.latest import io

from .dataset_cache import cache_path, encode_dataset


def captions_for(images: list, captions: list[str] | None) -> list[str]:
    """One caption per image: as given, one for all, or none (empty captions), as Make Training Dataset reads them."""
    captions = list(captions or [""])
    if len(captions) == 1:
        return captions * len(images)
    if len(captions) != len(images):
        raise ValueError(f"TriLoRAEncodeDataset: {len(captions)} captions for {len(images)} images; give one per "
                         "image, one for all, or none")
    return captions


class TriLoRAEncodeDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRAEncodeDataset",
            display_name="Encode Training Dataset (TriLoRA)",
            category="training",
            description="Encodes training images with the VAE and their captions with CLIP, once: with a cache "
                        "name, the latents and conditionings are kept in a file and read back on the next run "
                        "(only changed images or captions are encoded again).",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="The training images (Load Training Images (TriLoRA))."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the images."),
                io.Clip.Input("clip", tooltip="The text encoder that encodes the captions."),
                io.String.Input("captions", optional=True, force_input=True,
                                tooltip="One caption per image, one for all, or none (empty captions)."),
                io.String.Input(
                    "cache", default="",
                    tooltip="Empty: encode on every run, keep nothing. A name: a file in ComfyUI's output folder "
                            "(trilora_datasets/<name>.safetensors), or an absolute path, holding the encoded "
                            "dataset; an image or caption whose content changed is encoded again, a file made with "
                            "another VAE or CLIP is refused. The command line and every torchrun process read it."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", is_output_list=True,
                                 tooltip="One LATENT per image: feed Train TriLoRA's latents."),
                io.Conditioning.Output(display_name="conditioning", is_output_list=True,
                                       tooltip="One CONDITIONING per image: feed Train TriLoRA's positive."),
            ],
        )

    @classmethod
    def execute(cls, images, vae, clip, cache, captions=None):
        name = cache[0].strip()
        path = cache_path(name) if name else None
        done = encode_dataset(images, captions_for(images, captions), vae[0], clip[0], path)
        if path is not None:
            done.log_cache(path)
        return io.NodeOutput(done.latents, done.conditioning)


NODES = [TriLoRAEncodeDataset]
