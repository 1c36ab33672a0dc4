"""The encoded-dataset cache file (trilora_core/dataset_cache.py): what is written is read back
exactly; another kind of file, other encoders, an edited or damaged file are refused by name."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trilora_core import TriLoRAFileError, dataset_cache

ENCODERS = {"VAE": "a" * 64, "CLIP": "b" * 64}


def sample():
    gen = torch.Generator().manual_seed(0)
    latents = {"img1": torch.randn(1, 4, 8, 12, generator=gen), "img2": torch.randn(1, 4, 8, 8, generator=gen)}
    conds = {"cap1": [[torch.randn(1, 77, 768, generator=gen),
                       {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5, "note": None}]],
             "cap2": [[torch.randn(1, 77, 768, generator=gen).to(torch.bfloat16), {}],
                      [torch.randn(1, 77, 768, generator=gen), {"strength": 0.5}]]}
    return latents, conds


def test_what_is_written_is_read_back_exactly(tmp_path):
    latents, conds = sample()
    path = str(tmp_path / "sub" / "set.safetensors")
    dataset_cache.write_dataset_cache(path, latents, conds, ENCODERS)
    got_latents, got_conds = dataset_cache.read_dataset_cache(path, ENCODERS)
    assert got_latents.keys() == latents.keys() and got_conds.keys() == conds.keys()
    for key, latent in latents.items():
        assert torch.equal(got_latents[key], latent)
    for key, cond in conds.items():
        assert len(got_conds[key]) == len(cond)
        for (g, g_opts), (w, w_opts) in zip(got_conds[key], cond, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w) and g_opts.keys() == w_opts.keys()
            for option, value in w_opts.items():
                assert torch.equal(g_opts[option], value) if isinstance(value, torch.Tensor) else \
                    g_opts[option] == value
    # The same content gives the same bytes.
    again = str(tmp_path / "again.safetensors")
    dataset_cache.write_dataset_cache(again, latents, conds, ENCODERS)
    assert open(path, "rb").read() == open(again, "rb").read()


def test_digests_follow_content_only():
    a = torch.arange(12.0).reshape(3, 4)
    assert dataset_cache.tensor_digest([("x", a)]) == dataset_cache.tensor_digest([("x", a.clone())])
    assert dataset_cache.tensor_digest([("x", a)]) != dataset_cache.tensor_digest([("x", a.reshape(4, 3))])
    b = a.clone()
    b[2, 3] += 1e-3
    assert dataset_cache.tensor_digest([("x", a)]) != dataset_cache.tensor_digest([("x", b)])
    assert dataset_cache.tensor_digest([("x", a)]) != dataset_cache.tensor_digest([("x", a.double())])
    assert dataset_cache.text_digest("a cat") != dataset_cache.text_digest("a cat ")


def test_a_cache_of_other_encoders_is_refused_naming_the_encoder(tmp_path):
    path = str(tmp_path / "set.safetensors")
    dataset_cache.write_dataset_cache(path, *sample(), ENCODERS)
    with pytest.raises(TriLoRAFileError, match=rf"^{path}: encoded with another CLIP \(its weights' digest bbbbbbbbbbbb, "
                                               r"this one's cccccccccccc\); delete the file"):
        dataset_cache.read_dataset_cache(path, {"VAE": "a" * 64, "CLIP": "c" * 64})


def test_an_edited_or_damaged_cache_is_refused(tmp_path):
    path = tmp_path / "set.safetensors"
    dataset_cache.write_dataset_cache(str(path), *sample(), ENCODERS)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of one latent
    path.write_bytes(bytes(data))
    with pytest.raises(TriLoRAFileError, match="edited or damaged: its tensor data is not what was written"):
        dataset_cache.read_dataset_cache(str(path), ENCODERS)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(TriLoRAFileError, match=rf"^{path}: not a safetensors file"):
        dataset_cache.read_dataset_cache(str(path), ENCODERS)


def test_another_packs_safetensors_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(path), metadata={"ss_network_dim": "4"})
    with pytest.raises(TriLoRAFileError, match=r"not a TriLoRA dataset cache \(a safetensors file of another kind"):
        dataset_cache.read_dataset_cache(str(path), ENCODERS)
    pickle = tmp_path / "shard_0000.pkl"
    torch.save({"latents": []}, str(pickle))
    with pytest.raises(TriLoRAFileError, match="not a safetensors file"):
        dataset_cache.read_dataset_cache(str(pickle), ENCODERS)


def test_an_option_that_is_no_tensor_or_json_value_is_refused(tmp_path):
    latents, conds = sample()
    conds["cap1"][0][1]["hooks"] = object()
    with pytest.raises(ValueError, match="the conditioning option 'hooks' \\(object\\) cannot be cached"):
        dataset_cache.write_dataset_cache(str(tmp_path / "x.safetensors"), latents, conds, ENCODERS)
    assert not (tmp_path / "x.safetensors").exists()
