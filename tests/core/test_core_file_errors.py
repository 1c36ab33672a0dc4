"""Every problem a file can have gets one TriLoRAFileError with an exact, user-facing message."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from core_helpers import random_layer
from safetensors.torch import save_file

import trilora_core.safetensors_io as safetensors_io
from trilora_core import (
    TriLoRAFileError,
    TriLoRALayer,
    file_content_hash,
    read_adapter_file,
    read_trilora,
    write_trilora,
)
from trilora_core.safetensors_io import SafetensorsReader

Reader = Callable[[str], object]
BOTH_READERS = pytest.mark.parametrize("reader", [read_trilora, read_adapter_file], ids=["trilora", "adapter"])


def trilora_tensors(prefix: str = "lora_unet_x", out: int = 4, in_features: int = 3, rank: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        f"{prefix}.trilora_u": torch.randn(out, rank, generator=gen),
        f"{prefix}.trilora_s": torch.rand(rank, generator=gen),
        f"{prefix}.trilora_vt": torch.randn(rank, in_features, generator=gen),
        f"{prefix}.alpha": torch.tensor(2.0),
    }


def lora_tensors(prefix: str = "lora_unet_x", out: int = 4, in_features: int = 3, rank: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        f"{prefix}.lora_up.weight": torch.randn(out, rank, generator=gen),
        f"{prefix}.lora_down.weight": torch.randn(rank, in_features, generator=gen),
        f"{prefix}.alpha": torch.tensor(2.0),
    }


def save(tmp_path: Path, tensors: dict, name: str = "bad.safetensors") -> str:
    path = str(tmp_path / name)
    save_file(tensors, path)
    return path


def expect(reader: Reader, path: str, message: str) -> TriLoRAFileError:
    """``message`` is everything after "{path}: "."""
    with pytest.raises(TriLoRAFileError) as err:
        reader(path)
    assert str(err.value) == f"{path}: {message}"
    assert err.value.path == path
    return err.value


def test_error_attributes_and_format() -> None:
    with_key = TriLoRAFileError("a.safetensors", "p.trilora_s", "broken")
    assert (with_key.path, with_key.key, with_key.reason) == ("a.safetensors", "p.trilora_s", "broken")
    assert str(with_key) == "a.safetensors: p.trilora_s: broken"
    assert str(TriLoRAFileError(Path("a.safetensors"), None, "broken")) == "a.safetensors: broken"
    assert isinstance(with_key, ValueError)


# ------------------------------------------------------------------ not a usable safetensors file


@BOTH_READERS
def test_file_not_found(tmp_path: Path, reader: Reader) -> None:
    expect(reader, str(tmp_path / "nope.safetensors"), "file not found")


@BOTH_READERS
def test_directory(tmp_path: Path, reader: Reader) -> None:
    expect(reader, str(tmp_path), "not a file")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, trilora_tensors())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(safetensors_io, "open", denied, raising=False)
    expect(read_trilora, path, "cannot read the file (Permission denied)")


@BOTH_READERS
def test_pickle_checkpoints_are_refused(tmp_path: Path, reader: Reader) -> None:
    zipped = str(tmp_path / "model.pt")
    torch.save({"w": torch.zeros(2)}, zipped)
    expected = (
        "not a safetensors file (it looks like a pickled PyTorch checkpoint; only .safetensors files are supported)"
    )
    expect(reader, zipped, expected)
    legacy = str(tmp_path / "legacy.ckpt")
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    expect(reader, legacy, expected)


@BOTH_READERS
def test_too_short(tmp_path: Path, reader: Reader) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\x00")
    expect(reader, str(path), "not a safetensors file (too short)")
    path.write_bytes(b"")
    expect(reader, str(path), "not a safetensors file (too short)")


@BOTH_READERS
def test_invalid_header(tmp_path: Path, reader: Reader) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    expect(reader, str(path), "not a safetensors file (invalid header)")
    # A declared header longer than the file: refused before anything is allocated.
    path.write_bytes((10**9).to_bytes(8, "little") + b'{"a": 1}')
    expect(reader, str(path), "not a safetensors file (invalid header)")


@BOTH_READERS
def test_corrupt_file(tmp_path: Path, reader: Reader) -> None:
    path = save(tmp_path, trilora_tensors())
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-4])  # truncated tensor data
    with pytest.raises(TriLoRAFileError) as err:
        reader(path)
    detail = str(err.value.__cause__)
    assert "incomplete metadata" in detail
    assert str(err.value) == f"{path}: corrupt safetensors file ({detail})"


def test_unreadable_tensor(tmp_path: Path) -> None:
    path = save(tmp_path, trilora_tensors())

    class Broken:
        def get_slice(self, key):
            raise RuntimeError("boom")

        get_tensor = get_slice

    with SafetensorsReader(path) as reader:
        reader._file = Broken()
        with pytest.raises(TriLoRAFileError) as err:
            reader.shape("lora_unet_x.trilora_u")
        assert str(err.value) == f"{path}: lora_unet_x.trilora_u: cannot read the tensor (boom)"


def test_file_content_hash_checks_the_file(tmp_path: Path) -> None:
    expect(file_content_hash, str(tmp_path / "nope.safetensors"), "file not found")


# ------------------------------------------------------------------ TriLoRA structure


def test_no_tensors(tmp_path: Path) -> None:
    path = save(tmp_path, {})
    expect(read_trilora, path, "no TriLoRA layers: the file holds no tensors")
    expect(read_adapter_file, path, "no LoRA or TriLoRA layers: the file holds no tensors")


def test_no_trilora_layers(tmp_path: Path) -> None:
    path = save(tmp_path, {"model.diffusion_model.weight": torch.zeros(2), "x.alpha": torch.tensor(1.0)})
    expect(read_trilora, path, "no TriLoRA layers: no key ends in .trilora_u, .trilora_s or .trilora_vt")
    expect(read_adapter_file, path, "no LoRA or TriLoRA layers: no key is a LoRA or TriLoRA factor")


def test_lora_file_read_as_trilora(tmp_path: Path) -> None:
    path = save(tmp_path, lora_tensors())
    expect(read_trilora, path, "no TriLoRA layers: this is a LoRA file; load it with ComfyUI's LoraLoader")


def test_loha_file_read_as_trilora(tmp_path: Path) -> None:
    path = save(tmp_path, {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)})
    expect(read_trilora, path, "no TriLoRA layers: this is a LoHa file; load it with ComfyUI's LoraLoader")


def test_unknown_key(tmp_path: Path) -> None:
    path = save(tmp_path, {**trilora_tensors(), "lora_unet_x.scale": torch.tensor(1.0)})
    message = "lora_unet_x.scale: not a TriLoRA key (expected <prefix>.trilora_u, .trilora_s, .trilora_vt or .alpha)"
    err = expect(read_trilora, path, message)
    assert err.key == "lora_unet_x.scale"
    assert err.reason == message.split(": ", 1)[1]
    expect(read_adapter_file, path, message)


@BOTH_READERS
@pytest.mark.parametrize("part", ["trilora_u", "trilora_s", "trilora_vt"])
def test_missing_factor(tmp_path: Path, reader: Reader, part: str) -> None:
    tensors = {**trilora_tensors(), **trilora_tensors("lora_unet_y")}
    del tensors[f"lora_unet_y.{part}"]
    path = save(tmp_path, tensors)
    expect(
        reader, path, f"lora_unet_y.{part}: missing (every TriLoRA layer needs .trilora_u, .trilora_s and .trilora_vt)"
    )


def test_alpha_without_factors(tmp_path: Path) -> None:
    path = save(tmp_path, {**trilora_tensors(), "lora_unet_y.alpha": torch.tensor(1.0)})
    expect(
        read_trilora,
        path,
        "lora_unet_y.trilora_u: missing (every TriLoRA layer needs .trilora_u, .trilora_s and .trilora_vt)",
    )


@BOTH_READERS
@pytest.mark.parametrize(
    ("part", "dtype", "name"),
    [("trilora_u", torch.int64, "int64"), ("trilora_s", torch.bool, "bool"), ("trilora_vt", torch.uint8, "uint8")],
)
def test_factor_dtype(tmp_path: Path, reader: Reader, part: str, dtype: torch.dtype, name: str) -> None:
    tensors = trilora_tensors()
    tensors[f"lora_unet_x.{part}"] = tensors[f"lora_unet_x.{part}"].to(dtype)
    path = save(tmp_path, tensors)
    expect(
        reader, path, f"lora_unet_x.{part}: expected a float8, float16, bfloat16, float32 or float64 tensor, got {name}"
    )


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_factors_are_read_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    """ComfyUI reads float8 adapter files; so does the pack, exactly (float32 holds every float8)."""
    tensors = trilora_tensors()
    stored = tensors["lora_unet_x.trilora_u"].to(dtype)
    tensors["lora_unet_x.trilora_u"] = stored
    layer = read_trilora(save(tmp_path, tensors)).layers["lora_unet_x"]
    assert layer.u.dtype == torch.float32 and torch.equal(layer.u, stored.float())


@BOTH_READERS
@pytest.mark.parametrize(
    ("part", "shape", "message"),
    [
        ("trilora_u", (4,), "lora_unet_x.trilora_u: expected a 2-D tensor [out, rank], got shape [4]"),
        ("trilora_u", (4, 2, 1), "lora_unet_x.trilora_u: expected a 2-D tensor [out, rank], got shape [4, 2, 1]"),
        (
            "trilora_s",
            (4, 2),
            "lora_unet_x.trilora_s: expected a 1-D tensor of singular values, got shape [4, 2]",
        ),
        ("trilora_s", (), "lora_unet_x.trilora_s: expected a 1-D tensor of singular values, got shape []"),
        (
            "trilora_vt",
            (2,),
            "lora_unet_x.trilora_vt: expected a tensor [rank, in] or [rank, in, *kernel] (2-D to 5-D), got shape [2]",
        ),
        (
            "trilora_vt",
            (2, 1, 1, 1, 1, 1),
            "lora_unet_x.trilora_vt: expected a tensor [rank, in] or [rank, in, *kernel] (2-D to 5-D), "
            "got shape [2, 1, 1, 1, 1, 1]",
        ),
    ],
)
def test_factor_shapes(tmp_path: Path, reader: Reader, part: str, shape: tuple, message: str) -> None:
    tensors = trilora_tensors()
    tensors[f"lora_unet_x.{part}"] = torch.zeros(shape)
    expect(reader, save(tmp_path, tensors), message)


@BOTH_READERS
def test_rank_zero(tmp_path: Path, reader: Reader) -> None:
    tensors = trilora_tensors(rank=0)
    expect(reader, save(tmp_path, tensors), "lora_unet_x.trilora_s: rank must be at least 1, got shape [0]")


@BOTH_READERS
def test_zero_sized_dimension(tmp_path: Path, reader: Reader) -> None:
    expect(
        reader,
        save(tmp_path, trilora_tensors(out=0)),
        "lora_unet_x.trilora_u: expected no zero-sized dimension, got shape [0, 2]",
    )
    expect(
        reader,
        save(tmp_path, trilora_tensors(in_features=0), "b.safetensors"),
        "lora_unet_x.trilora_vt: expected no zero-sized dimension, got shape [2, 0]",
    )


@BOTH_READERS
def test_ranks_disagree(tmp_path: Path, reader: Reader) -> None:
    tensors = trilora_tensors(out=8, rank=4)
    tensors["lora_unet_x.trilora_s"] = torch.ones(3)
    tensors["lora_unet_x.trilora_vt"] = torch.ones(4, 6)
    expect(
        reader,
        save(tmp_path, tensors),
        "lora_unet_x: ranks disagree: trilora_u has shape [8, 4], trilora_s has shape [3], trilora_vt has shape [4, 6]",
    )


@BOTH_READERS
@pytest.mark.parametrize("part", ["trilora_u", "trilora_s", "trilora_vt"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, -1])  # first element, and the last (a vector loop's tail)
def test_non_finite_values(tmp_path: Path, reader: Reader, part: str, bad: float, where: int) -> None:
    tensors = trilora_tensors()
    tensors[f"lora_unet_x.{part}"].view(-1)[where] = bad
    expect(reader, save(tmp_path, tensors), f"lora_unet_x.{part}: contains NaN or infinite values")


def test_non_finite_half_values(tmp_path: Path) -> None:
    tensors = {k: v.to(torch.float16) for k, v in trilora_tensors().items()}
    tensors["lora_unet_x.trilora_s"][1] = math.inf
    expect(read_trilora, save(tmp_path, tensors), "lora_unet_x.trilora_s: contains NaN or infinite values")


@BOTH_READERS
@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (torch.tensor([1.0, 2.0]), "lora_unet_x.alpha: expected a scalar, got shape [2]"),
        (torch.tensor(True), "lora_unet_x.alpha: expected a numeric scalar, got bool"),
        (torch.tensor(0.0), "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got 0.0"),
        (torch.tensor(-4.0), "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got -4.0"),
        (torch.tensor(math.nan), "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got nan"),
        (torch.tensor(math.inf), "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got inf"),
        (torch.tensor(2e6), "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got 2000000.0"),
        (torch.tensor(0), "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got 0.0"),
    ],
)
def test_bad_alpha(tmp_path: Path, reader: Reader, alpha: torch.Tensor, message: str) -> None:
    tensors = trilora_tensors()
    tensors["lora_unet_x.alpha"] = alpha
    expect(reader, save(tmp_path, tensors), message)


def test_good_alpha_variants(tmp_path: Path) -> None:
    tensors = trilora_tensors()
    tensors["lora_unet_x.alpha"] = torch.tensor([8], dtype=torch.int32)  # one-element and integer: fine
    assert read_trilora(save(tmp_path, tensors)).layers["lora_unet_x"].alpha == 8.0


# ------------------------------------------------------------------ other adapter files


# Every adapter kind ComfyUI's LoraLoader reads (or PEFT writes) that TriLoRA cannot convert exactly:
# refused whole, the kind named, ComfyUI's LoraLoader pointed to.
OTHER_KINDS = [
    ("lora_unet_x.hada_w1_a", "LoHa"),
    ("lora_unet_x.lokr_w1", "LoKr"),
    ("lora_unet_x.oft_blocks", "OFT/BOFT"),
    ("lora_unet_x.boft_blocks", "BOFT"),
    ("lora_unet_x.rescale", "OFT/BOFT"),
    ("lora_unet_x.dora_scale", "DoRA (LyCORIS dora_scale)"),
    ("lora_unet_x.lora_magnitude_vector", "DoRA (PEFT lora_magnitude_vector)"),
    ("lora_unet_x.lora_magnitude_vector.weight", "DoRA (PEFT lora_magnitude_vector)"),
    ("lora_unet_x.ia3_l", "IA3"),
    ("lora_unet_x.on_input", "IA3"),
    ("lora_unet_x.set_weight", "full-weight (set_weight)"),
    ("lora_unet_x.w_norm", "full-weight norm diff (w_norm)"),
    ("lora_unet_x.a1.weight", "GLoRA"),
]


@pytest.mark.parametrize(("key", "kind"), OTHER_KINDS)
def test_other_adapter_types(tmp_path: Path, key: str, kind: str) -> None:
    path = save(tmp_path, {**lora_tensors(), key: torch.zeros(2, 2)})
    expect(
        read_adapter_file,
        path,
        f"{key}: this is a {kind} file, which TriLoRA cannot convert exactly; load it with ComfyUI's LoraLoader",
    )


def test_peft_dora_file_is_named_dora(tmp_path: Path) -> None:
    """Issue 13, input 4: DoRA in PEFT naming."""
    prefix = "unet.down_blocks.0.attentions.0.proj_in"
    path = save(
        tmp_path,
        {
            f"{prefix}.lora_A.weight": torch.ones(2, 8),
            f"{prefix}.lora_B.weight": torch.ones(8, 2),
            f"{prefix}.lora_magnitude_vector": torch.ones(8),
        },
    )
    err = expect(
        read_adapter_file,
        path,
        f"{prefix}.lora_magnitude_vector: this is a DoRA (PEFT lora_magnitude_vector) file, which TriLoRA "
        "cannot convert exactly; load it with ComfyUI's LoraLoader",
    )
    assert err.key == f"{prefix}.lora_magnitude_vector"


def test_a_diff_only_file_is_a_full_weight_diff(tmp_path: Path) -> None:
    path = save(tmp_path, {"lora_unet_x.diff": torch.zeros(2, 2), "lora_unet_x.diff_b": torch.zeros(2)})
    expect(
        read_adapter_file,
        path,
        "this is a full-weight diff file (.diff / .diff_b only, as LyCORIS 'full' writes it): it holds no "
        "low-rank layer; load it with ComfyUI's LoraLoader",
    )


def test_diffs_beside_lora_layers_are_read(tmp_path: Path) -> None:
    """ComfyUI TrainLoraNode files: LoRA factors, plus .diff for norms and .diff_b for biases."""
    norm = torch.tensor([1.0, -2.0, 3.0], dtype=torch.bfloat16)
    bias = torch.tensor([0.5, 0.25], dtype=torch.float16)
    path = save(tmp_path, {**lora_tensors(), "lora_unet_norm.diff": norm, "lora_unet_x.diff_b": bias})
    read = read_adapter_file(path)
    assert list(read.layers) == ["lora_unet_x"]
    assert set(read.diffs) == {"lora_unet_norm.diff", "lora_unet_x.diff_b"}
    assert read.diffs["lora_unet_norm.diff"].dtype == torch.float32
    assert torch.equal(read.diffs["lora_unet_norm.diff"], norm.float())
    assert torch.equal(read.diffs["lora_unet_x.diff_b"], bias.float())


def test_a_diff_on_a_low_rank_layer_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, {**lora_tensors(), "lora_unet_x.diff": torch.zeros(2, 2)})
    expect(
        read_adapter_file,
        path,
        "lora_unet_x.diff: adapts the same weight as the low-rank layer lora_unet_x; a file may adapt each "
        "weight once",
    )


def test_soft_in_a_module_name_is_not_oft(tmp_path: Path) -> None:
    path = save(tmp_path, lora_tensors("lora_unet_soft_attn"))
    assert list(read_adapter_file(path).layers) == ["lora_unet_soft_attn"]


def test_tucker_locon(tmp_path: Path) -> None:
    path = save(tmp_path, {**lora_tensors(), "lora_unet_x.lora_mid.weight": torch.zeros(2, 2, 3, 3)})
    expect(
        read_adapter_file,
        path,
        "lora_unet_x.lora_mid.weight: this is a LoCon file with Tucker decomposition (lora_mid), whose change "
        "is not a low-rank matrix; load it with ComfyUI's LoraLoader",
    )


def test_mixed_lora_and_trilora(tmp_path: Path) -> None:
    path = save(tmp_path, {**trilora_tensors(), **lora_tensors("lora_unet_y")})
    expect(
        read_adapter_file,
        path,
        "lora_unet_y.lora_down.weight: LoRA key in a TriLoRA file; a file may hold one adapter type only",
    )


# ------------------------------------------------------------------ LoRA structure


def test_lora_unknown_key(tmp_path: Path) -> None:
    path = save(tmp_path, {**lora_tensors(), "lora_unet_x.lora_up.bias": torch.zeros(4)})
    expect(read_adapter_file, path, "lora_unet_x.lora_up.bias: not a LoRA or TriLoRA key")


def test_lora_two_namings_for_one_layer(tmp_path: Path) -> None:
    tensors = {**lora_tensors(), "lora_unet_x.lora_B.weight": torch.zeros(4, 2)}
    expect(
        read_adapter_file,
        save(tmp_path, tensors),
        "lora_unet_x.lora_down.weight: the same layer is also stored as lora_unet_x.lora_B.weight; "
        "a layer may use one naming only",
    )


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        ("lora_unet_x.lora_up.weight", "lora_unet_x.lora_up.weight"),
        ("lora_unet_x.lora_down.weight", "lora_unet_x.lora_down.weight"),
    ],
)
def test_lora_missing_factor(tmp_path: Path, drop: str, missing: str) -> None:
    tensors = lora_tensors()
    del tensors[drop]
    expect(
        read_adapter_file,
        save(tmp_path, tensors),
        f"{missing}: missing (every LoRA layer needs both up and down weights)",
    )


def test_lora_missing_factor_other_naming(tmp_path: Path) -> None:
    tensors = {"unet.x_lora.up.weight": torch.zeros(4, 2)}
    expect(
        read_adapter_file,
        save(tmp_path, tensors),
        "unet.x_lora.down.weight: missing (every LoRA layer needs both up and down weights)",
    )


def test_lora_alpha_without_factors(tmp_path: Path) -> None:
    tensors = {**lora_tensors(), "lora_unet_y.alpha": torch.tensor(1.0)}
    expect(
        read_adapter_file,
        save(tmp_path, tensors),
        "lora_unet_y.lora_up.weight: missing (every LoRA layer needs both up and down weights)",
    )


@pytest.mark.parametrize(
    ("up", "down", "message"),
    [
        ((4,), (2, 3), "lora_unet_x.lora_up.weight: expected [out, rank] or [out, rank, 1, 1], got shape [4]"),
        (
            (4, 2, 3, 3),
            (2, 3, 3, 3),
            "lora_unet_x.lora_up.weight: expected [out, rank] or [out, rank, 1, 1], got shape [4, 2, 3, 3]",
        ),
        (
            (4, 2),
            (2,),
            "lora_unet_x.lora_down.weight: expected [rank, in] or [rank, in, *kernel] (2-D to 5-D), got shape [2]",
        ),
        (
            (4, 2),
            (3, 5),
            "lora_unet_x: ranks disagree: lora_up.weight has shape [4, 2], lora_down.weight has shape [3, 5]",
        ),
        ((4, 0), (0, 3), "lora_unet_x.lora_up.weight: rank must be at least 1, got shape [4, 0]"),
        ((0, 2), (2, 3), "lora_unet_x.lora_up.weight: expected no zero-sized dimension, got shape [0, 2]"),
        ((4, 2), (2, 0), "lora_unet_x.lora_down.weight: expected no zero-sized dimension, got shape [2, 0]"),
    ],
)
def test_lora_shapes(tmp_path: Path, up: tuple, down: tuple, message: str) -> None:
    tensors = {"lora_unet_x.lora_up.weight": torch.zeros(up), "lora_unet_x.lora_down.weight": torch.zeros(down)}
    expect(read_adapter_file, save(tmp_path, tensors), message)


def test_lora_dtype_values_and_alpha(tmp_path: Path) -> None:
    tensors = lora_tensors()
    tensors["lora_unet_x.lora_down.weight"] = tensors["lora_unet_x.lora_down.weight"].to(torch.int32)
    expect(
        read_adapter_file,
        save(tmp_path, tensors, "a.safetensors"),
        "lora_unet_x.lora_down.weight: expected a float8, float16, bfloat16, float32 or float64 tensor, got int32",
    )
    tensors = lora_tensors()
    tensors["lora_unet_x.lora_up.weight"][0, 0] = math.nan
    expect(
        read_adapter_file,
        save(tmp_path, tensors, "b.safetensors"),
        "lora_unet_x.lora_up.weight: contains NaN or infinite values",
    )
    tensors = lora_tensors()
    tensors["lora_unet_x.alpha"] = torch.tensor(-1.0)
    expect(
        read_adapter_file,
        save(tmp_path, tensors, "c.safetensors"),
        "lora_unet_x.alpha: expected a finite alpha > 0 and <= 1000000, got -1.0",
    )


# ------------------------------------------------------------------ writing


def write_error(path: Path, layers: dict, **kwargs) -> str:
    with pytest.raises(TriLoRAFileError) as err:
        write_trilora(path, layers, **kwargs)
    assert not path.exists()  # nothing written on refusal
    return str(err.value)


def test_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    assert write_error(path, {}) == f"{path}: no layers to write"


def test_write_bad_dtype(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    layer = random_layer(3, 3, (), 2, seed=0)
    assert write_error(path, {"p": layer}, dtype=torch.int8) == (
        f"{path}: expected a float16, bfloat16, float32 or float64 tensor, got int8"
    )
    fp8 = TriLoRALayer(u=layer.u.to(torch.float8_e4m3fn), s=layer.s, vt=layer.vt, alpha=1.0)
    assert write_error(path, {"p": fp8}, canonical=False) == (
        f"{path}: p.trilora_u: expected a float16, bfloat16, float32 or float64 tensor, got float8_e4m3fn"
    )


def test_write_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    layer = random_layer(3, 3, (), 2, seed=0)
    assert write_error(path, {"p": layer}, metadata={"ss_network_dim": 4}) == (
        f"{path}: metadata must map str to str, got 'ss_network_dim': int"
    )


def test_write_bad_prefix(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    assert write_error(path, {"": random_layer(3, 3, (), 2, seed=0)}) == f"{path}: invalid layer prefix ''"


def test_write_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    layer = random_layer(3, 3, (), 2, seed=0)
    layer.s[0] = math.nan
    assert write_error(path, {"p": layer}, canonical=False) == f"{path}: p.trilora_s: contains NaN or infinite values"
    # float16 overflow while casting is caught too.
    big = random_layer(3, 3, (), 2, seed=0)
    big.s[0] = 1e6
    assert write_error(path, {"p": big}, canonical=False, dtype=torch.float16) == (
        f"{path}: p.trilora_s: contains NaN or infinite values"
    )


@pytest.mark.parametrize(("alpha", "shown"), [(0.0, "0.0"), (-2.0, "-2.0"), (1e7, "10000000.0"), (1e-50, "1e-50")])
def test_write_bad_alpha(tmp_path: Path, alpha: float, shown: str) -> None:
    path = tmp_path / "a.safetensors"
    layer = random_layer(3, 3, (), 2, seed=0, alpha=alpha)
    assert write_error(path, {"p": layer}) == (
        f"{path}: p.alpha: expected a finite alpha > 0 and <= 1000000, got {shown}"
    )
