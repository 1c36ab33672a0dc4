from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from core_helpers import PROPERTY, STORAGE_DTYPES, layers, random_layer, reference_delta, rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import trilora_core.safetensors_io as safetensors_io
from trilora_core import (
    TRAINING_ARGS_KEY,
    TriLoRALayer,
    canonicalize,
    content_hash,
    file_content_hash,
    is_canonical,
    lora_to_trilora,
    read_adapter_file,
    read_trilora,
    write_trilora,
)

CALLER_METADATA = {
    "ss_base_model_version": "sd_v1",
    "modelspec.architecture": "stable-diffusion-v1/trilora",
    TRAINING_ARGS_KEY: json.dumps({"rank": 4, "learning_rate": 1e-4}),
}


def sample_layers() -> dict[str, TriLoRALayer]:
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in": random_layer(8, 6, (), 4, seed=1, alpha=4.0),
        "lora_unet_conv_in": random_layer(6, 3, (3, 3), 3, seed=2, alpha=1.5),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": random_layer(5, 7, (), 2, seed=3, alpha=2.0),
    }


@settings(PROPERTY, max_examples=25)
@given(data=st.lists(layers(), min_size=1, max_size=3))
def test_write_read_round_trip_is_bit_exact(data: list[TriLoRALayer]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_round_trip(Path(tmp) / "adapter.safetensors", data)


def check_round_trip(path: Path, data: list[TriLoRALayer]) -> None:
    written = {f"lora_unet_block_{i}": layer for i, layer in enumerate(data)}
    assert write_trilora(path, written, CALLER_METADATA, canonical=False) == str(path)
    result = read_trilora(path)
    assert list(result.layers) == sorted(written)
    for prefix, layer in written.items():
        back = result.layers[prefix]
        for name in ("u", "s", "vt"):
            original, loaded = getattr(layer, name), getattr(back, name)
            assert loaded.dtype == original.dtype
            assert torch.equal(loaded, original)
        # alpha is stored as a float32 scalar
        assert back.alpha == float(torch.tensor(layer.alpha, dtype=torch.float32))
    for key, value in CALLER_METADATA.items():
        assert result.metadata[key] == value


def test_written_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    given_layers = sample_layers()
    write_trilora(path, given_layers, {**CALLER_METADATA, "ss_network_module": "networks.lora"})
    meta = read_trilora(path).metadata
    assert meta["trilora_format"] == "1"
    assert meta["ss_network_module"] == "trilora"  # content keys always win
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4"  # alphas differ: the one of the largest-rank layer
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/trilora"
    assert json.loads(meta[TRAINING_ARGS_KEY]) == {"rank": 4, "learning_rate": 1e-4}
    assert meta["sshs_model_hash"] == file_content_hash(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["sshs_model_hash"] == content_hash(tensors)
    assert all(t.shape == () and t.dtype == torch.float32 for k, t in tensors.items() if k.endswith(".alpha"))


def test_common_alpha_and_fractional_alpha(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    layer = random_layer(4, 4, (), 2, seed=0, alpha=0.5)
    write_trilora(path, {"a": layer, "b": layer})
    assert read_trilora(path).metadata["ss_network_alpha"] == "0.5"


def test_write_canonicalizes(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    given_layers = sample_layers()
    write_trilora(path, given_layers)
    for prefix, layer in read_trilora(path).layers.items():
        assert is_canonical(layer)
        assert rel_error(reference_delta(layer), reference_delta(given_layers[prefix])) < 1e-5


def test_rewriting_a_canonical_file_gives_the_same_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_trilora(first, sample_layers(), CALLER_METADATA, dtype=torch.float16)
    loaded = read_trilora(first)
    write_trilora(second, loaded.layers, loaded.metadata)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_write_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "a.safetensors"
    write_trilora(path, sample_layers(), dtype=dtype)
    for layer in read_trilora(path).layers.values():
        assert layer.u.dtype == layer.s.dtype == layer.vt.dtype == dtype


def test_write_accepts_parameters_and_views(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    base = canonicalize(random_layer(8, 6, (), 4, seed=5))
    trainable = TriLoRALayer(
        u=torch.nn.Parameter(base.u), s=torch.nn.Parameter(base.s), vt=torch.nn.Parameter(base.vt), alpha=4.0
    )
    view = TriLoRALayer(u=base.u[:, :2], s=base.s[:2], vt=base.vt[:2], alpha=2.0)
    write_trilora(path, {"a": trainable, "b": view, "c": view}, canonical=False)
    loaded = read_trilora(path).layers
    assert torch.equal(loaded["a"].u, base.u)
    assert torch.equal(loaded["b"].vt, base.vt[:2])


def test_read_adapter_file_reads_trilora_too(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_trilora(path, sample_layers(), CALLER_METADATA)
    direct, generic = read_trilora(path), read_adapter_file(path)
    assert direct.metadata == generic.metadata
    for prefix, layer in direct.layers.items():
        assert torch.equal(layer.u, generic.layers[prefix].u)


def test_alpha_absent_means_rank(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    layer = canonicalize(random_layer(5, 4, (), 3, seed=6))
    save_file({"p.trilora_u": layer.u, "p.trilora_s": layer.s, "p.trilora_vt": layer.vt}, str(path))
    assert read_trilora(path).layers["p"].alpha == 3.0
    assert read_trilora(path).metadata == {}


@pytest.mark.parametrize(
    ("up_name", "down_name"),
    [
        ("{}.lora_up.weight", "{}.lora_down.weight"),
        ("{}.lora_B.weight", "{}.lora_A.weight"),
        ("{}.lora.up.weight", "{}.lora.down.weight"),
        ("{}_lora.up.weight", "{}_lora.down.weight"),
    ],
)
def test_read_lora_files(tmp_path: Path, up_name: str, down_name: str) -> None:
    path = tmp_path / "lora.safetensors"
    gen = torch.Generator().manual_seed(0)
    linear_up, linear_down = torch.randn(8, 4, generator=gen), torch.randn(4, 6, generator=gen)
    conv_up, conv_down = torch.randn(5, 3, 1, 1, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    tensors = {
        up_name.format("lora_unet_a"): linear_up,
        down_name.format("lora_unet_a"): linear_down,
        "lora_unet_a.alpha": torch.tensor(2.0, dtype=torch.float16),
        up_name.format("lora_unet_conv"): conv_up,
        down_name.format("lora_unet_conv"): conv_down,
    }
    save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
    result = read_adapter_file(path)
    assert result.metadata == {"ss_network_dim": "4"}
    assert sorted(result.layers) == ["lora_unet_a", "lora_unet_conv"]
    a, conv = result.layers["lora_unet_a"], result.layers["lora_unet_conv"]
    assert is_canonical(a) and is_canonical(conv)
    assert a.scale == 0.5
    assert conv.scale == 1.0  # no alpha: alpha = rank
    expected_a = 0.5 * linear_up @ linear_down
    expected_conv = (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(5, 2, 3, 3)
    assert rel_error(reference_delta(a), expected_a) < 1e-5
    assert rel_error(reference_delta(conv), expected_conv) < 1e-5
    reference = lora_to_trilora(linear_up, linear_down, 2.0)
    assert torch.equal(a.s, reference.s)


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_trilora(path, sample_layers())
    write_trilora(path, sample_layers())  # replacing an existing file
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_written_file_mode_follows_umask(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    write_trilora(path, sample_layers())
    old = os.umask(0o022)
    os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~old


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = tmp_path / "a.safetensors"
    write_trilora(path, sample_layers())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        write_trilora(path, {"other": random_layer(3, 3, (), 1, seed=9)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_interrupted_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    write_trilora(path, sample_layers())
    before = path.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_trilora(path, {"other": random_layer(3, 3, (), 1, seed=9)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_trilora(tmp_path / "missing" / "a.safetensors", sample_layers())
    assert os.listdir(tmp_path) == []
