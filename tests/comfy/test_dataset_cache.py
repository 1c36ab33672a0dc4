"""Encode Training Dataset (TriLoRA) and its cache file: the outputs of VAE Encode / CLIP Text Encode
(Make Training Dataset's), encoded once and read back; a changed picture or caption (same name,
size and modification time) re-encoded alone; a cache of other encoders, an edited file or another
kind of file refused by name before anything trains. Real ComfyUI, the tiny SD1.5 checkpoint."""
from __future__ import annotations

import os

import comfy.sd
import pytest
import torch
from conftest import run_node
from PIL import Image
from test_dataset_chain import make_training_dataset

from harness.host import pack_module


class Counted:
    """The tiny VAE and CLIP, counting what they encode."""

    def __init__(self, vae, clip):
        self.vae, self.clip, self.images, self.captions = vae, clip, 0, 0
        self._vae_encode, self._clip_encode = vae.encode, clip.encode_from_tokens_scheduled

    def __enter__(self):
        def vae_encode(pixels):
            self.images += 1
            return self._vae_encode(pixels)

        def clip_encode(tokens, **kwargs):
            self.captions += 1
            return self._clip_encode(tokens, **kwargs)

        self.vae.encode, self.clip.encode_from_tokens_scheduled = vae_encode, clip_encode
        return self

    def __exit__(self, *exc):
        del self.vae.encode, self.clip.encode_from_tokens_scheduled


def folder_of_pictures(folder) -> None:
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 64)]):
        Image.new("RGB", (w, h), (60 * i, 120, 200 - 50 * i)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture number {i}", encoding="utf-8")


def encode(comfy_host, tiny, folder, cache: str, vae=None, clip=None):
    with torch.inference_mode():
        images, captions = run_node(comfy_host, "TriLoRASampleImages", folder=str(folder), size=128)
        return run_node(comfy_host, "TriLoRAEncodeDataset", images=images, vae=[vae or tiny.vae],
                        clip=[clip or tiny.clip], captions=captions, cache=[cache])


def assert_same(got, want) -> None:
    (got_latents, got_conds), (want_latents, want_conds) = got, want
    assert len(got_latents) == len(want_latents) == len(got_conds) == len(want_conds)
    for g, w in zip(got_latents, want_latents, strict=True):
        assert torch.equal(g["samples"], w["samples"])
    for g, w in zip(got_conds, want_conds, strict=True):
        assert len(g) == len(w)
        for (g_cond, g_extra), (w_cond, w_extra) in zip(g, w, strict=True):
            assert torch.equal(g_cond, w_cond) and g_extra.keys() == w_extra.keys()
            for key, value in w_extra.items():
                assert torch.equal(g_extra[key], value) if isinstance(value, torch.Tensor) else g_extra[key] == value


def test_without_a_cache_it_outputs_what_make_training_dataset_does(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    with torch.inference_mode():
        images, captions = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128)
        want = make_training_dataset(images, tiny.vae, tiny.clip, captions)
        one_caption = run_node(comfy_host, "TriLoRAEncodeDataset", images=images, vae=[tiny.vae], clip=[tiny.clip],
                               captions=["the same for all"], cache=[""])
    assert_same(encode(comfy_host, tiny, tmp_path, ""), want)
    assert len(one_caption[1]) == 3 and all(torch.equal(c[0][0], one_caption[1][0][0][0]) for c in one_caption[1])
    with pytest.raises(ValueError, match="TriLoRAEncodeDataset: 2 captions for 3 images"):
        run_node(comfy_host, "TriLoRAEncodeDataset", images=images, vae=[tiny.vae], clip=[tiny.clip],
                 captions=["a", "b"], cache=[""])


def test_the_cache_encodes_once_and_reads_back_the_same(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    with Counted(tiny.vae, tiny.clip) as count:
        first = encode(comfy_host, tiny, tmp_path, "once/set")
        assert (count.images, count.captions) == (3, 3)
        path = comfy_host.folder_paths.get_output_directory() + "/trilora_datasets/once/set.safetensors"
        assert os.path.isfile(path)
        written = open(path, "rb").read()
        again = encode(comfy_host, tiny, tmp_path, "once/set")
        assert (count.images, count.captions) == (3, 3)  # nothing encoded: all read from the file
    assert_same(again, first)
    assert open(path, "rb").read() == written  # a run that encodes nothing leaves the file as it was


def test_a_changed_picture_or_caption_with_the_same_name_size_and_mtime_is_encoded_again(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    cache = str(tmp_path / "cache.safetensors")
    first = encode(comfy_host, tiny, tmp_path, cache)
    picture, caption = tmp_path / "p1.png", tmp_path / "p2.txt"
    stat_p, stat_c, size_c = picture.stat(), caption.stat(), caption.stat().st_size
    Image.new("RGB", (128, 64), (250, 0, 0)).save(picture)  # another picture, same size in pixels
    caption.write_text("picture number 7", encoding="utf-8")  # same length
    os.utime(picture, ns=(stat_p.st_atime_ns, stat_p.st_mtime_ns))
    os.utime(caption, ns=(stat_c.st_atime_ns, stat_c.st_mtime_ns))
    assert caption.stat().st_size == size_c and caption.stat().st_mtime_ns == stat_c.st_mtime_ns
    with Counted(tiny.vae, tiny.clip) as count:
        latents, conds = encode(comfy_host, tiny, tmp_path, cache)
    assert (count.images, count.captions) == (1, 1)
    assert torch.equal(latents[0]["samples"], first[0][0]["samples"])
    assert not torch.equal(latents[1]["samples"], first[0][1]["samples"])
    assert not torch.equal(conds[2][0][0], first[1][2][0][0]) and torch.equal(conds[1][0][0], first[1][1][0][0])
    with Counted(tiny.vae, tiny.clip) as count:
        assert_same(encode(comfy_host, tiny, tmp_path, cache), (latents, conds))  # the file holds the new items
    assert (count.images, count.captions) == (0, 0)


def test_a_cache_of_another_clip_or_vae_is_refused_naming_the_file(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    cache = str(tmp_path / "cache.safetensors")
    encode(comfy_host, tiny, tmp_path, cache)
    skip = comfy_host.nodes.CLIPSetLastLayer().set_last_layer(tiny.clip, -2)[0]  # the same weights, clip skip 2
    with pytest.raises(ValueError, match=rf"^{cache}: encoded with another CLIP \(its weights' digest"):
        encode(comfy_host, tiny, tmp_path, cache, clip=skip)
    sd = tiny.vae.get_sd()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim > 1)
    other = comfy.sd.VAE(sd={**sd, key: sd[key] + 1e-3})  # one weight changed
    with pytest.raises(ValueError, match=rf"^{cache}: encoded with another VAE"):
        encode(comfy_host, tiny, tmp_path, cache, vae=other)


def test_the_clips_digest_leaves_out_the_tensors_a_checkpoint_may_lack(comfy_host, tiny):
    # SD1.5 checkpoints lack CLIP-L's text projection: ComfyUI leaves it uninitialised, so each
    # process holds other bytes there (torchrun ranks refused rank 0's cache as "another CLIP").
    module = pack_module(comfy_host, "nodes.dataset_cache")
    model = tiny.clip.cond_stage_model

    def digest_of_a_new_object() -> str:  # digests are kept per object: a second one, the same modules
        clip = tiny.clip.clone()
        clip.cond_stage_model = type(model).__new__(type(model))
        clip.cond_stage_model.__dict__.update(model.__dict__)
        return module.clip_digest(clip)

    state = model.state_dict()
    (unset,) = [k for k in state if k.endswith(".transformer.text_projection.weight")]
    real = next(k for k in state if k.endswith("q_proj.weight"))
    saved = {k: state[k].clone() for k in (unset, real)}
    digest = module.clip_digest(tiny.clip)
    with torch.inference_mode():  # the loaded weights are inference tensors
        try:
            state[unset].copy_(torch.randn_like(saved[unset]))  # other garbage in the unset tensor
            assert digest_of_a_new_object() == digest
            state[real][0, 0] += 1  # a weight the checkpoint holds still counts
            assert digest_of_a_new_object() != digest
        finally:
            for k, value in saved.items():  # bit for bit: the session's CLIP is shared
                state[k].copy_(value)
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k == real)


def test_edited_and_foreign_files_are_refused_before_anything_trains(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    cache = tmp_path / "cache.safetensors"
    encode(comfy_host, tiny, tmp_path, str(cache))
    data = bytearray(cache.read_bytes())
    data[-3] ^= 1
    cache.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{cache}: edited or damaged"):
        encode(comfy_host, tiny, tmp_path, str(cache))
    lora = comfy_host.loras / "not_a_dataset.safetensors"
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(lora))
    with pytest.raises(ValueError, match=rf"^{lora}: not a TriLoRA dataset cache"):
        encode(comfy_host, tiny, tmp_path, str(lora))
    with pytest.raises(ValueError, match="cache '../../outside.safetensors' leaves"):
        encode(comfy_host, tiny, tmp_path, "../../outside")


def test_a_process_that_only_reads_refuses_a_cache_that_lacks_an_item(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    cache = str(tmp_path / "cache.safetensors")
    encode(comfy_host, tiny, tmp_path, cache)
    (tmp_path / "p3.png").write_bytes((tmp_path / "p0.png").read_bytes())
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "p3.png")
    module = pack_module(comfy_host, "nodes.dataset_cache")
    with torch.inference_mode():
        images, captions = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128)
        with pytest.raises(ValueError, match=rf"cache {cache} lacks 1 image\(s\) and 1 caption\(s\) of this dataset"):
            module.encode_dataset(images, captions, tiny.vae, tiny.clip, cache, encode=False)


def test_training_on_the_cached_dataset_equals_training_on_the_encoded_one(comfy_host, tiny, tmp_path):
    folder_of_pictures(tmp_path)
    cache = str(tmp_path / "cache.safetensors")
    inputs = {"steps": [2], "rank": [2], "training_dtype": ["fp32"], "gradient_checkpointing": [False],
              "batch_size": [2], "seed": [1], "learning_rate": [1e-3]}
    losses = []
    for name in ("", cache, cache):  # encoded, encoded and written, read
        latents, conds = encode(comfy_host, tiny, tmp_path, name)
        with torch.inference_mode():
            losses.append(run_node(comfy_host, "TrainTriLoRA", model=[tiny.model], latents=latents, positive=conds,
                                   **inputs)[2]["loss"])
    assert losses[0] == losses[1] == losses[2]
