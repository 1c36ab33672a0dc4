"""TriLoRASampleImages: the bundled sample style set (and any folder of captioned images) loads as
ComfyUI's lists of IMAGE and STRING, square and of one size, ready for VAE Encode and CLIP Text
Encode in the training workflow."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_node
from PIL import Image

SAMPLES = REPO / "workflows" / "sample_style"


def test_the_node_is_registered_with_list_outputs_and_tooltips(comfy_host):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRASampleImages"]
    assert list(cls.RETURN_TYPES) == ["IMAGE", "STRING"]
    assert list(cls.OUTPUT_IS_LIST) == [True, True]
    assert all(cls.OUTPUT_TOOLTIPS)
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["folder", "size"]
    assert all(spec[1]["tooltip"] for spec in required.values())
    assert required["folder"][1]["default"] == ""


def test_default_is_the_bundled_sample_set_with_its_captions(comfy_host):
    images, captions = run_node(comfy_host, "TriLoRASampleImages", folder="", size=64)
    files = sorted(SAMPLES.glob("*.png"))
    assert len(files) == 8
    assert len(images) == len(captions) == len(files)
    for image, caption, file in zip(images, captions, files, strict=True):
        assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert caption == file.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption.startswith("trlstyle, ")


def test_full_size_keeps_the_pixels(comfy_host):
    images, _ = run_node(comfy_host, "TriLoRASampleImages", folder="", size=512)
    want = torch.tensor(list(Image.open(SAMPLES / "shapes_00.png").convert("RGB").getdata()), dtype=torch.float32)
    assert torch.equal(images[0].reshape(-1, 3) * 255.0, want)


def test_a_folder_of_any_images_is_cropped_square_with_missing_captions_empty(comfy_host, tmp_path):
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (100, 0, 200, 100))  # the blue middle third is what a centre crop keeps
    wide.save(tmp_path / "b_wide.png")
    Image.new("RGB", (80, 80), (0, 255, 0)).save(tmp_path / "a_green.jpg")
    (tmp_path / "a_green.txt").write_text("  a green square \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")
    images, captions = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=64)
    assert captions == ["a green square", ""]
    assert [tuple(i.shape) for i in images] == [(1, 64, 64, 3), (1, 64, 64, 3)]
    torch.testing.assert_close(images[1][0].mean(dim=(0, 1)), torch.tensor([0.0, 0.0, 1.0]), atol=0.01, rtol=0)
    assert images[0][0, 32, 32, 1] > 0.9 and images[0][0, 32, 32, 0] < 0.1


def test_a_relative_folder_is_read_from_comfyuis_input_directory(comfy_host, tmp_path):
    input_dir = tmp_path / "input"
    (input_dir / "my_style").mkdir(parents=True)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(input_dir / "my_style" / "one.png")
    before = comfy_host.folder_paths.get_input_directory()
    comfy_host.folder_paths.set_input_directory(str(input_dir))
    try:
        images, captions = run_node(comfy_host, "TriLoRASampleImages", folder="my_style", size=64)
    finally:
        comfy_host.folder_paths.set_input_directory(before)
    assert len(images) == 1 and captions == [""]


def test_missing_or_empty_folders_fail_with_the_path(comfy_host, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"folder not found: {missing}"):
        run_node(comfy_host, "TriLoRASampleImages", folder=str(missing), size=64)
    with pytest.raises(ValueError, match=f"no images .* in {tmp_path}$"):
        run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=64)


def test_fingerprint_changes_when_the_folder_changes(comfy_host, tmp_path):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRASampleImages"]
    Image.new("RGB", (64, 64)).save(tmp_path / "one.png")
    first = cls.fingerprint_inputs(folder=str(tmp_path), size=64)
    assert cls.fingerprint_inputs(folder=str(tmp_path), size=64) == first
    Image.new("RGB", (64, 64)).save(tmp_path / "two.png")
    assert cls.fingerprint_inputs(folder=str(tmp_path), size=64) != first
    assert cls.fingerprint_inputs(folder=str(tmp_path), size=128) != cls.fingerprint_inputs(folder=str(tmp_path), size=64)


def test_a_caption_rewritten_in_place_with_its_old_size_and_time_is_seen(comfy_host, tmp_path):
    """cp -p / rsync -t keep size and mtime: the fingerprint (the loaders' change check) still
    changes, so the executor re-reads the folder instead of serving the old captions."""
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRASampleImages"]
    Image.new("RGB", (64, 64)).save(tmp_path / "one.png")
    caption = tmp_path / "one.txt"
    caption.write_text("a red square", encoding="utf-8")
    first = cls.fingerprint_inputs(folder=str(tmp_path), size=64)
    time.sleep(0.05)  # the user edits later; the file system's clock ticks in milliseconds
    stat = caption.stat()
    with open(caption, "r+", encoding="utf-8") as f:  # in place: the same inode
        f.write("a blue circle"[: len("a red square")])
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = caption.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    assert cls.fingerprint_inputs(folder=str(tmp_path), size=64) != first
    assert run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=64)[1] == ["a blue circl"]

    # A caption added beside an image, or removed, changes it too.
    Image.new("RGB", (64, 64)).save(tmp_path / "two.png")
    second = cls.fingerprint_inputs(folder=str(tmp_path), size=64)
    (tmp_path / "two.txt").write_text("x", encoding="utf-8")
    assert cls.fingerprint_inputs(folder=str(tmp_path), size=64) != second
    (tmp_path / "two.txt").unlink()
    assert cls.fingerprint_inputs(folder=str(tmp_path), size=64) == second


def test_sample_images_encode_with_the_tiny_vae(comfy_host, tiny):
    images, _ = run_node(comfy_host, "TriLoRASampleImages", folder="", size=64)
    latent = comfy_host.nodes.VAEEncode().encode(tiny.vae, images[0])[0]["samples"]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_committed_sample_set_is_what_the_script_draws():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_images.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
