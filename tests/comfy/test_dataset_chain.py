"""Train TriLoRA fed by ComfyUI's own dataset chain (comfy_extras/nodes_dataset.py, ComfyUI 0.33):
Make Training Dataset gives a LATENT and a one-entry CONDITIONING per image, Save/Load Training
Dataset give the same back from disk, and Resolution Bucket gives, per bucket, one LATENT batch
and the list of its images' own conditioning entries. Each image must train with its own caption.

ComfyUI 0.3.75 has no Resolution Bucket: the builders below follow these nodes' code so the suite
runs the same inputs on every version, and tests check the builders against the real nodes where
they exist (Resolution Bucket on 0.33)."""
from __future__ import annotations

import pytest
import torch
from conftest import run_node

from harness.host import pack_module

CAPTIONS = ["a red square", "a green bar", "a blue circle", "a grey cat"]


def make_training_dataset(images: list[torch.Tensor], vae, clip, texts: list[str]):
    """MakeTrainingDataset.execute: a LATENT per [1, H, W, 3] image, a scheduled encoding per caption."""
    latents = [{"samples": vae.encode(image[:, :, :, :3])} for image in images]
    return latents, [clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in texts]


def save_and_load_training_dataset(latents: list, conditioning: list, folder):
    """SaveTrainingDataset then LoadTrainingDataset: a shard written with torch.save, read back
    with torch.load(weights_only=True)."""
    path = folder / "shard_0000.pkl"
    with open(path, "wb") as f:
        torch.save({"latents": latents, "conditioning": conditioning}, f)
    with open(path, "rb") as f:
        shard = torch.load(f, weights_only=True)
    return shard["latents"], shard["conditioning"]


def resolution_bucket(latents: list, conditioning: list):
    """ResolutionBucket.execute: every image with entry i of its LATENT's conditioning, grouped by
    (H, W) in order of first appearance; per bucket the stacked latents and the list of entries."""
    buckets: dict[tuple, tuple[list, list]] = {}
    for latent, cond in zip(latents, conditioning, strict=True):
        for i, sample in enumerate(latent["samples"]):
            bucket = buckets.setdefault(tuple(sample.shape[-2:]), ([], []))
            bucket[0].append(sample)
            bucket[1].append(cond[i])
    return [{"samples": torch.stack(b[0])} for b in buckets.values()], [b[1] for b in buckets.values()]


def images(widths: list[int]) -> list[torch.Tensor]:
    """[1, 64, W, 3] images, each a different flat colour with a bright bar in its own place."""
    out = []
    for i, width in enumerate(widths):
        image = torch.full((1, 64, width, 3), 0.2)
        image[..., i % 3] = 0.8
        image[:, 8 * i: 8 * i + 16, 4:20, :] = 1.0
        out.append(image)
    return out


@pytest.fixture(scope="module")
def dataset(comfy_host, tiny):
    """Make Training Dataset's outputs for 4 captioned images, the last one wider (2 buckets)."""
    with torch.inference_mode():
        return make_training_dataset(images([64, 64, 64, 96]), tiny.vae, tiny.clip, CAPTIONS)


def pairing(comfy_host, latents, positive) -> list[tuple[int, ...]]:
    """The cond entries each image trains with, as Train TriLoRA reads its inputs."""
    batches = pack_module(comfy_host, "nodes.training.batches")
    split, sources = batches.split_latents(latents)
    return batches.split_conditioning(positive, len(split), sources)[1]


def captions_of(positive, image_conds) -> list[list[torch.Tensor]]:
    entries = [e for cond in positive for e in cond]
    return [[entries[j][0] for j in conds] for conds in image_conds]


def test_four_images_in_one_bucket_each_train_with_their_own_caption(comfy_host, tiny):
    with torch.inference_mode():
        latents, conds = resolution_bucket(*make_training_dataset(images([64] * 4), tiny.vae, tiny.clip, CAPTIONS))
    assert len(latents) == 1 and latents[0]["samples"].shape[0] == 4 and len(conds[0]) == 4
    assert pairing(comfy_host, latents, conds) == [(0,), (1,), (2,), (3,)]


def test_two_buckets_keep_every_caption_with_its_image(comfy_host, dataset):
    latents, conds = resolution_bucket(*dataset)
    assert [lat["samples"].shape[0] for lat in latents] == [3, 1]
    image_conds = pairing(comfy_host, latents, conds)
    assert image_conds == [(0,), (1,), (2,), (3,)]
    for got, want in zip(captions_of(conds, image_conds), dataset[1], strict=True):
        assert len(got) == 1 and torch.equal(got[0], want[0][0])


def test_make_and_load_training_dataset_outputs_pair_one_caption_per_image(comfy_host, dataset, tmp_path):
    assert pairing(comfy_host, *dataset) == [(0,), (1,), (2,), (3,)]
    loaded = save_and_load_training_dataset(*dataset, tmp_path)
    assert pairing(comfy_host, *loaded) == [(0,), (1,), (2,), (3,)]
    # Loaded and bucketed: still each image with its own caption.
    assert pairing(comfy_host, *resolution_bucket(*loaded)) == [(0,), (1,), (2,), (3,)]


def test_a_real_multi_entry_conditioning_still_conditions_every_image_of_its_batch(comfy_host, dataset, tiny):
    nodes = comfy_host.nodes
    batch = {"samples": torch.cat([dataset[0][i]["samples"] for i in range(3)])}
    with torch.inference_mode():
        a, b, c = (dataset[1][i] for i in range(3))
        early = nodes.ConditioningSetTimestepRange().set_range(a, 0.0, 0.5)[0]
        late = nodes.ConditioningSetTimestepRange().set_range(b, 0.5, 1.0)[0]
        area = nodes.ConditioningSetArea().append(c, 32, 32, 0, 0, 1.0)[0]
        by_time = nodes.ConditioningCombine().combine(early, late)[0]
        three = nodes.ConditioningCombine().combine(nodes.ConditioningCombine().combine(a, b)[0], area)[0]
        two = nodes.ConditioningCombine().combine(a, b)[0]
    # Entries applied together (timestep ranges, areas) or not one per image: every image gets all.
    assert pairing(comfy_host, [batch], [three]) == [(0, 1, 2)] * 3
    assert pairing(comfy_host, [batch], [two]) == [(0, 1)] * 3
    two_images = {"samples": batch["samples"][:2]}
    assert pairing(comfy_host, [two_images], [by_time]) == [(0, 1)] * 2
    # One plain entry per image of the batch is Resolution Bucket's shape: entry i is image i's.
    assert pairing(comfy_host, [two_images], [two]) == [(0,), (1,)]


def train_loss(comfy_host, model, latents, positive) -> list[float]:
    inputs = {"steps": [2], "rank": [2], "training_dtype": ["fp32"], "gradient_checkpointing": [False],
              "batch_size": [3], "seed": [4], "learning_rate": [1e-3]}
    with torch.inference_mode():
        return run_node(comfy_host, "TrainTriLoRA", model=[model], latents=latents, positive=positive, **inputs)[2]["loss"]


def test_training_on_buckets_equals_training_on_the_dataset_it_came_from(comfy_host, dataset, tiny):
    # Same images, same captions per image, same seed: the same losses, step by step. Reading a
    # bucket's entries as one conditioning for all its images gives other losses.
    direct = train_loss(comfy_host, tiny.model, *dataset)
    bucketed = train_loss(comfy_host, tiny.model, *resolution_bucket(*dataset))
    assert bucketed == pytest.approx(direct, rel=1e-5)
    latents, conds = resolution_bucket(*dataset)
    mixed = [[e for cond in conds for e in cond]] * len(latents)  # every image with all four captions
    assert train_loss(comfy_host, tiny.model, latents, mixed) != pytest.approx(direct, rel=1e-3)


def real_nodes(comfy_host, *names: str) -> None:
    missing = [n for n in names if n not in comfy_host.nodes.NODE_CLASS_MAPPINGS]
    if missing:
        pytest.skip(f"this ComfyUI has no {', '.join(missing)} (0.3.75 lacks ResolutionBucket): the builders here "
                    "stand in for it")


@pytest.fixture
def made_and_loaded(comfy_host, tiny, tmp_path):
    """Make Training Dataset's outputs for the dataset's images, and the same saved and loaded."""
    real_nodes(comfy_host, "MakeTrainingDataset", "SaveTrainingDataset", "LoadTrainingDataset")
    # Datasets live in the datasets folder (0.33) or the output folder (0.3.75).
    comfy_host.folder_paths.add_model_folder_path("datasets", str(tmp_path), is_default=True)
    nodes, folder = comfy_host.nodes.NODE_CLASS_MAPPINGS, f"chain-{tmp_path.name}"
    with torch.inference_mode():
        made = run_node(comfy_host, "MakeTrainingDataset", images=images([64, 64, 64, 96]), vae=[tiny.vae],
                        clip=[tiny.clip], texts=CAPTIONS)
        nodes["SaveTrainingDataset"].execute(latents=made[0], conditioning=made[1], folder_name=[folder],
                                             shard_size=[1000])
        loaded = run_node(comfy_host, "LoadTrainingDataset", folder_name=folder)
    return made, loaded


def test_the_builders_equal_comfyuis_make_save_and_load_training_dataset(made_and_loaded, dataset):
    made, loaded = made_and_loaded
    assert_same(made, dataset)
    assert_same(loaded, dataset)


def test_the_builder_equals_comfyuis_resolution_bucket(comfy_host, made_and_loaded, dataset):
    real_nodes(comfy_host, "ResolutionBucket")
    with torch.inference_mode():
        bucketed = run_node(comfy_host, "ResolutionBucket", latents=made_and_loaded[1][0],
                            conditioning=made_and_loaded[1][1])
    assert_same(bucketed, resolution_bucket(*dataset))
    assert pairing(comfy_host, *bucketed) == [(0,), (1,), (2,), (3,)]


def assert_same(got, want) -> None:
    """Same LATENT list and CONDITIONING list, tensor for tensor."""
    (got_latents, got_conds), (want_latents, want_conds) = got, want
    assert len(got_latents) == len(want_latents) and len(got_conds) == len(want_conds)
    for g, w in zip(got_latents, want_latents, strict=True):
        torch.testing.assert_close(g["samples"], w["samples"])
    for g, w in zip(got_conds, want_conds, strict=True):
        assert len(g) == len(w)
        for (g_cond, g_extra), (w_cond, w_extra) in zip(g, w, strict=True):
            torch.testing.assert_close(g_cond, w_cond)
            assert g_extra.keys() == w_extra.keys()
