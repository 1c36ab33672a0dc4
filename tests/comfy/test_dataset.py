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
    images, captions = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=64, resize="square crop")
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


def picture(path, width: int, height: int, colour=(200, 40, 40)) -> None:
    """A flat picture with a white centre mark and a dark left edge, so crops and scales show."""
    image = Image.new("RGB", (width, height), colour)
    image.paste((0, 0, 0), (0, 0, max(1, width // 16), height))
    image.paste((255, 255, 255), (width // 2 - 4, height // 2 - 4, width // 2 + 4, height // 2 + 4))
    image.save(path)


def test_aspect_buckets_keep_each_pictures_aspect_at_most_size_squared(comfy_host, tmp_path):
    picture(tmp_path / "a_wide.png", 384, 128)
    picture(tmp_path / "b_tall.png", 150, 300)
    picture(tmp_path / "c_small.png", 100, 70)
    picture(tmp_path / "d_square.png", 256, 256)
    images, _ = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128)
    # No upscale (the default): larger pictures scaled down to the 128 x 128 area, kohya's rounding,
    # then cut to steps of 64; the small one at its own size, cut down to 64 x 64.
    assert [tuple(i.shape[1:3]) for i in images] == [(64, 192), (128, 64), (64, 64), (128, 128)]
    # The wide one scaled to 192 x 64 whole; the small one cropped about its centre (its white mark).
    wide, small = images[0][0], images[2][0]
    assert wide[32, 96].min() > 0.9 and wide[32, 0].max() < 0.1
    assert small[32, 32].min() > 0.9 and small[32, 0].max() > 0.1  # the dark left edge is cropped off
    upscaled, _ = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128, upscale=True)
    # Upscale on: kohya's predefined buckets for 128 (sides 64..256), the nearest aspect, the small one enlarged.
    assert [tuple(i.shape[1:3]) for i in upscaled] == [(64, 192), (192, 64), (128, 128), (128, 128)]
    assert upscaled[2][0, 64, 64].min() > 0.9
    square, _ = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128, resize="square crop")
    assert {tuple(i.shape[1:3]) for i in square} == {(128, 128)}


def test_the_sample_set_is_the_same_in_buckets_and_square_crops(comfy_host):
    # Square pictures: the bucket is the square, scaled the same way; saved workflows train as before.
    buckets, _ = run_node(comfy_host, "TriLoRASampleImages", folder="", size=64)
    square, _ = run_node(comfy_host, "TriLoRASampleImages", folder="", size=64, resize="square crop")
    assert all(torch.equal(a, b) for a, b in zip(buckets, square, strict=True))


def test_a_picture_under_the_smallest_bucket_names_the_file(comfy_host, tmp_path):
    picture(tmp_path / "ok.png", 128, 128)
    picture(tmp_path / "thin.png", 300, 40)
    with pytest.raises(ValueError, match=r"thin\.png: a picture of 300 x 40 px is smaller than the smallest bucket "
                                         r"\(64 px a side\); turn upscale on, or leave the picture out"):
        run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128)
    images, _ = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128, upscale=True)
    assert [tuple(i.shape[1:3]) for i in images] == [(128, 128), (64, 256)]


def test_a_picture_alone_in_its_bucket_gets_a_note_naming_it(comfy_host, tmp_path, caplog):
    for name in ("a.png", "b.png"):
        picture(tmp_path / name, 128, 128)
    picture(tmp_path / "lone.png", 256, 128)
    with caplog.at_level("WARNING", logger="comfyui-trilora"):
        images, _ = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128)
    assert [tuple(i.shape[1:3]) for i in images] == [(128, 128), (128, 128), (64, 128)]
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["TriLoRA: lone.png is the only picture in its bucket (128 x 64 px): it trains alone, in "
                     "batches of one"]
