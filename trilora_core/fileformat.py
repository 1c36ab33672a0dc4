"""The TriLoRA file format (docs/file-format.md): reading with full validation, atomic writing.

For each adapted weight with module prefix P: ``P.trilora_u`` [out, r], ``P.trilora_s`` [r],
``P.trilora_vt`` [r, in] or [r, in, *kernel], optional ``P.alpha`` scalar (absent: alpha = r).
Reading is the trust boundary: every tensor is checked before a layer is built from it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .canonical import canonicalize, is_canonical
from .checks import (
    MAX_FACTOR_NDIM,
    R_ALPHA_VALUE,
    R_FACTOR_DTYPE,
    R_NOT_FINITE,
    R_TOO_LARGE,
    TORCH_FACTOR_DTYPES,
    NamedReader,
    Validator,
    alpha_ok,
    fits_float32,
    max_abs,
    shape_str,
)
from .convert import lora_to_trilora
from .errors import TriLoRAFileError
from .formatting import format_number
from .layer import TriLoRALayer
from .safetensors_io import SafetensorsReader, atomic_write_bytes, data_hash, serialize
from .suffixes import (
    ALPHA_PART,
    LORA_MID_SUFFIX,
    LORA_NAMINGS,
    TRILORA_PARTS,
    LoraNaming,
    other_adapter_kind,
    split_diff_key,
    split_lora_key,
    split_trilora_key,
)
from .timestep_rank import banded, read_schedule

FORMAT_VERSION = "1"
FORMAT_KEY = "trilora_format"
TRAINING_ARGS_KEY = "trilora_training_args"  # JSON string of the training arguments
HASH_KEY = "sshs_model_hash"
@dataclass
class TriLoRAFile:
    """Layers by module prefix (sorted), and the file's metadata (possibly empty).

    ``diffs`` holds the full-weight diffs a LoRA file may carry beside its layers (ComfyUI's
    TrainLoraNode writes ``P.diff`` for norms and ``P.diff_b`` for biases), by key, float32."""

    layers: dict[str, TriLoRALayer]
    metadata: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def _no_layers_reason(keys: list[str], what: str) -> str:
    if not keys:
        return f"no {what} layers: the file holds no tensors"
    for key in sorted(keys):
        kind = other_adapter_kind(key) or ("LoRA" if split_lora_key(key) else None)
        if kind is not None:
            return f"no {what} layers: this is a {kind} file; load it with ComfyUI's LoraLoader"
    return f"no {what} layers: no key ends in .trilora_u, .trilora_s or .trilora_vt"


def _read_trilora_layers(check: Validator, keys: list[str]) -> dict[str, TriLoRALayer]:
    groups = _group_trilora_keys(check, keys)
    # Pass 1: names, dtypes and shapes from the header only; no tensor data read yet.
    for prefix, parts in groups.items():
        _check_trilora_header(check, prefix, parts)
    # Pass 2: values.
    layers: dict[str, TriLoRALayer] = {}
    for prefix, parts in sorted(groups.items()):
        (u, u_max), (s, s_max), (vt, vt_max) = (check.finite_tensor(parts[p]) for p in TRILORA_PARTS)
        alpha = check.alpha(parts.get(ALPHA_PART), s.shape[0])
        layers[prefix] = check.bounded(prefix, TriLoRALayer(u=u, s=s, vt=vt, alpha=alpha), (u_max, s_max, vt_max))
    return layers


def _group_trilora_keys(check: Validator, keys: list[str]) -> dict[str, dict[str, str]]:
    """{prefix: {part: key}}; raises when the file has no TriLoRA layer or a key of another kind."""
    groups: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in sorted(keys):
        split = split_trilora_key(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = key
    if not any(part in TRILORA_PARTS for parts in groups.values() for part in parts):
        raise check.fail(None, _no_layers_reason(keys, "TriLoRA"))
    if unknown:
        raise check.fail(
            unknown[0], "not a TriLoRA key (expected <prefix>.trilora_u, .trilora_s, .trilora_vt or .alpha)"
        )
    return groups


def _check_trilora_header(check: Validator, prefix: str, parts: dict[str, str]) -> None:
    """One layer's parts, dtypes and shapes, from the header alone."""
    for part in TRILORA_PARTS:
        if part not in parts:
            raise check.fail(
                f"{prefix}.{part}", "missing (every TriLoRA layer needs .trilora_u, .trilora_s and .trilora_vt)"
            )
    u_key, s_key, vt_key = (parts[p] for p in TRILORA_PARTS)
    for key in (u_key, s_key, vt_key):
        check.factor_dtype(key)
    u_shape, s_shape, vt_shape = (check.reader.shape(k) for k in (u_key, s_key, vt_key))
    if len(u_shape) != 2:
        raise check.fail(u_key, f"expected a 2-D tensor [out, rank], got shape {shape_str(u_shape)}")
    if len(s_shape) != 1:
        raise check.fail(s_key, f"expected a 1-D tensor of singular values, got shape {shape_str(s_shape)}")
    if not 2 <= len(vt_shape) <= MAX_FACTOR_NDIM:
        raise check.fail(
            vt_key,
            f"expected a tensor [rank, in] or [rank, in, *kernel] (2-D to 5-D), got shape {shape_str(vt_shape)}",
        )
    if s_shape[0] == 0:
        raise check.fail(s_key, "rank must be at least 1, got shape [0]")
    check.no_zero_dims(u_key, u_shape)
    check.no_zero_dims(vt_key, vt_shape)
    if not u_shape[1] == s_shape[0] == vt_shape[0]:
        raise check.fail(
            prefix,
            f"ranks disagree: trilora_u has shape {shape_str(u_shape)}, trilora_s has shape "
            f"{shape_str(s_shape)}, trilora_vt has shape {shape_str(vt_shape)}",
        )


def _read_lora_layers(check: Validator, keys: list[str]) -> dict[str, TriLoRALayer]:
    """Standard LoRA / LoCon layers, each converted exactly to canonical TriLoRA form."""
    pairs, alphas = _pair_lora_keys(check, keys)
    for prefix, (naming, sides) in pairs.items():
        _check_lora_header(check, prefix, naming, sides)
    return {prefix: _lora_layer(check, prefix, sides, alphas.get(prefix))
            for prefix, (_, sides) in sorted(pairs.items())}


def _pair_lora_keys(check: Validator, keys: list[str]
                    ) -> tuple[dict[str, tuple[LoraNaming, dict[str, str]]], dict[str, str]]:
    """({prefix: (naming, {"up"/"down": key})}, {prefix: alpha key}); raises for a key of another
    kind or a layer stored under two namings."""
    pairs: dict[str, tuple[LoraNaming, dict[str, str]]] = {}
    alphas: dict[str, str] = {}
    for key in sorted(keys):
        split = split_lora_key(key)
        if split is not None:
            prefix, naming, side = split
            seen_naming, sides = pairs.setdefault(prefix, (naming, {}))
            if seen_naming != naming:
                other = next(iter(sides.values()))
                raise check.fail(key, f"the same layer is also stored as {other}; a layer may use one naming only")
            sides[side] = key
        elif key.endswith("." + ALPHA_PART) and len(key) > len(ALPHA_PART) + 1:
            alphas[key[: -len(ALPHA_PART) - 1]] = key
        else:
            raise check.fail(key, "not a LoRA or TriLoRA key")
    for prefix in alphas:
        pairs.setdefault(prefix, (LORA_NAMINGS[0], {}))  # an alpha without factors
    return pairs, alphas


def _check_lora_header(check: Validator, prefix: str, naming: LoraNaming, sides: dict[str, str]) -> None:
    """One LoRA layer's factors, dtypes and shapes, from the header alone."""
    for side, suffix in (("up", naming.up), ("down", naming.down)):
        if side not in sides:
            raise check.fail(f"{prefix}{suffix}", "missing (every LoRA layer needs both up and down weights)")
    up_key, down_key = sides["up"], sides["down"]
    check.factor_dtype(up_key)
    check.factor_dtype(down_key)
    up_shape, down_shape = check.reader.shape(up_key), check.reader.shape(down_key)
    if not 2 <= len(up_shape) <= MAX_FACTOR_NDIM or any(d != 1 for d in up_shape[2:]):
        raise check.fail(up_key, f"expected [out, rank] or [out, rank, 1, 1], got shape {shape_str(up_shape)}")
    if not 2 <= len(down_shape) <= MAX_FACTOR_NDIM:
        raise check.fail(
            down_key,
            f"expected [rank, in] or [rank, in, *kernel] (2-D to 5-D), got shape {shape_str(down_shape)}",
        )
    if up_shape[1] != down_shape[0]:
        raise check.fail(
            prefix,
            f"ranks disagree: {naming.up.lstrip('.')} has shape {shape_str(up_shape)}, "
            f"{naming.down.lstrip('.')} has shape {shape_str(down_shape)}",
        )
    if up_shape[1] == 0:
        raise check.fail(up_key, f"rank must be at least 1, got shape {shape_str(up_shape)}")
    check.no_zero_dims(up_key, up_shape)
    check.no_zero_dims(down_key, down_shape)


def _lora_layer(check: Validator, prefix: str, sides: dict[str, str], alpha_key: str | None) -> TriLoRALayer:
    """One LoRA layer's values, converted exactly to canonical TriLoRA form."""
    # float32 before the conversion: the SVD of half or float8 factors would round the delta
    (up, _), (down, _) = check.finite_tensor(sides["up"], True), check.finite_tensor(sides["down"], True)
    alpha = check.alpha(alpha_key, up.shape[1])
    try:
        layer = lora_to_trilora(up, down, alpha)
    except torch.linalg.LinAlgError as err:  # the SVD met values that overflowed float32
        raise check.fail(prefix, R_TOO_LARGE.format("float32")) from err
    maxima = tuple(max_abs(t) for t in (layer.u, layer.s, layer.vt))
    if not all(math.isfinite(m) for m in maxima):
        # huge finite factors: the canonical form overflowed in float32 or in their dtype
        raise check.fail(prefix, R_TOO_LARGE.format(str(layer.u.dtype).removeprefix("torch.")))
    return check.bounded(prefix, layer, maxima)


def _read_diffs(check: Validator, keys: list[str], layers: Mapping[str, TriLoRALayer]) -> dict[str, Tensor]:
    """The file's ``P.diff`` / ``P.diff_b`` tensors, float32; a weight may have a layer or a diff."""
    diffs = {}
    for key in keys:
        prefix, part = split_diff_key(key)
        if part == "diff" and prefix in layers:
            raise check.fail(key, f"adapts the same weight as the low-rank layer {prefix}; a file may adapt "
                                  "each weight once")
        check.factor_dtype(key)
        check.no_zero_dims(key, check.reader.shape(key))
        diffs[key] = check.finite_tensor(key, True)[0]
    return diffs


def _open(path: str | os.PathLike[str], rename: Mapping[str, str] | None) -> tuple[SafetensorsReader, Validator]:
    reader = SafetensorsReader(path)
    try:
        return reader, Validator(NamedReader(reader, rename))
    except BaseException:
        reader.__exit__(None, None, None)
        raise


def read_trilora(path: str | os.PathLike[str]) -> TriLoRAFile:
    """Read and validate a TriLoRA file; any problem raises TriLoRAFileError naming it."""
    reader, check = _open(path, None)
    with reader:
        layers = _read_trilora_layers(check, check.reader.keys())
        return TriLoRAFile(layers=layers, metadata=reader.metadata())


def read_adapter_file(path: str | os.PathLike[str], rename: Mapping[str, str] | None = None) -> TriLoRAFile:
    """Read a TriLoRA file, or a standard LoRA / LoCon file converted exactly to canonical
    TriLoRA layers (prefixes as in the file, float32 or float64), with any full-weight diffs
    it carries beside them. Other adapter types raise TriLoRAFileError naming the type.

    ``rename`` maps stored keys to the names they are read under (ComfyUI's renames of some
    trainers' files, which nodes/ supplies); errors name keys as stored."""
    reader, check = _open(path, rename)
    with reader:
        keys = check.reader.keys()
        for key in keys:
            if key.endswith(LORA_MID_SUFFIX):
                raise check.fail(
                    key, "this is a LoCon file with Tucker decomposition (lora_mid), whose change is not a "
                    "low-rank matrix; load it with ComfyUI's LoraLoader"
                )
            kind = other_adapter_kind(key)
            if kind is not None:
                raise check.fail(key, f"this is a {kind} file, which TriLoRA cannot convert exactly; load it "
                                      "with ComfyUI's LoraLoader")
        diff_keys = [k for k in keys if split_diff_key(k)]
        keys = [k for k in keys if not split_diff_key(k)]
        trilora_keys = [k for k in keys if (split := split_trilora_key(k)) and split[1] in TRILORA_PARTS]
        lora_keys = [k for k in keys if split_lora_key(k)]
        if trilora_keys and lora_keys:
            raise check.fail(lora_keys[0], "LoRA key in a TriLoRA file; a file may hold one adapter type only")
        if trilora_keys:
            layers = _read_trilora_layers(check, keys)
        elif lora_keys:
            layers = _read_lora_layers(check, keys)
        elif diff_keys:
            raise check.fail(None, "this is a full-weight diff file (.diff / .diff_b only, as LyCORIS 'full' "
                                   "writes it): it holds no low-rank layer; load it with ComfyUI's LoraLoader")
        elif not keys:
            raise check.fail(None, "no LoRA or TriLoRA layers: the file holds no tensors")
        else:
            raise check.fail(None, "no LoRA or TriLoRA layers: no key is a LoRA or TriLoRA factor")
        return TriLoRAFile(layers=layers, metadata=reader.metadata(), diffs=_read_diffs(check, diff_keys, layers))


# --------------------------------------------------------------------------- writing


def _format_metadata(layers: Mapping[str, TriLoRALayer], alphas: Mapping[str, float]) -> dict[str, str]:
    max_rank = max(layer.rank for layer in layers.values())
    distinct = set(alphas.values())
    if len(distinct) == 1:
        alpha = distinct.pop()
    else:  # kohya has one alpha per network: report the one of the (first) largest-rank layer
        alpha = next(alphas[p] for p in sorted(layers) if layers[p].rank == max_rank)
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "ss_network_module": "trilora",
        "ss_network_dim": str(max_rank),
        "ss_network_alpha": format_number(alpha),
    }


def write_trilora(
    path: str | os.PathLike[str],
    layers: Mapping[str, TriLoRALayer],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    canonical: bool = True,
) -> str:
    """Write ``layers`` (by module prefix) to ``path`` atomically and return the path.

    Layers are put in canonical form first (per band of T-LoRA's schedule where the metadata
    records one: timestep_rank.banded; unless ``canonical`` is False or they already
    are), cast to ``dtype`` (None keeps each tensor's dtype) and checked like the reader
    checks them, so every written file can be read back. Alpha is stored as a float32 scalar.
    Metadata: the caller's entries plus trilora_format, ss_network_module, ss_network_dim,
    ss_network_alpha and sshs_model_hash (these five always come from the content).
    """
    path = os.fspath(path)
    if not layers:
        raise TriLoRAFileError(path, None, "no layers to write")
    if dtype is not None and dtype not in TORCH_FACTOR_DTYPES:
        raise TriLoRAFileError(path, None, R_FACTOR_DTYPE.format(str(dtype).removeprefix("torch.")))
    meta: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TriLoRAFileError(path, None, f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        meta[key] = value

    try:
        schedule = read_schedule(meta)
    except ValueError as err:
        raise TriLoRAFileError(path, None, str(err)) from None
    tensors: dict[str, Tensor] = {}
    written: dict[str, TriLoRALayer] = {}
    alphas: dict[str, float] = {}
    for prefix in sorted(layers, key=str):  # key=str: a bad prefix gets our error, not a TypeError
        if not isinstance(prefix, str) or not prefix:
            raise TriLoRAFileError(path, None, f"invalid layer prefix {prefix!r}")
        layer = layers[prefix]
        if not canonical:
            written[prefix] = layer
        elif schedule:  # T-LoRA's bands kept apart: each masked prefix stays the trained one
            written[prefix] = banded(layer, *schedule)
        else:
            written[prefix] = layer if is_canonical(layer) else canonicalize(layer)
        alphas[prefix] = _layer_tensors(path, prefix, written[prefix], dtype, tensors)

    meta.update(_format_metadata(written, alphas))
    # The hash covers tensor data only, so adding it to the header does not change it.
    meta[HASH_KEY] = data_hash(serialize(tensors, meta))
    atomic_write_bytes(path, serialize(tensors, meta))
    return path


def _layer_tensors(path: str, prefix: str, layer: TriLoRALayer, dtype: torch.dtype | None,
                   tensors: dict[str, Tensor]) -> float:
    """Adds one layer's tensors, as stored (``dtype``, CPU, alpha as a float32 scalar), to
    ``tensors``, checked as the reader checks them; returns the stored alpha."""
    maxima = []
    for part, tensor in zip(TRILORA_PARTS, (layer.u, layer.s, layer.vt), strict=True):
        key = f"{prefix}.{part}"
        tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype)
        if tensor.dtype not in TORCH_FACTOR_DTYPES:
            raise TriLoRAFileError(path, key, R_FACTOR_DTYPE.format(str(tensor.dtype).removeprefix("torch.")))
        maxima.append(max_abs(tensor))
        if not math.isfinite(maxima[-1]):  # after the cast: float16 may overflow
            raise TriLoRAFileError(path, key, R_NOT_FINITE)
        # A private contiguous copy: safetensors refuses tensors that share storage.
        tensors[key] = tensor.clone(memory_format=torch.contiguous_format)
    alpha = torch.tensor(layer.alpha, dtype=torch.float32)
    if not alpha_ok(float(alpha)):
        raise TriLoRAFileError(path, f"{prefix}.{ALPHA_PART}", R_ALPHA_VALUE.format(repr(layer.alpha)))
    stored = TriLoRALayer(*(tensors[f"{prefix}.{part}"] for part in TRILORA_PARTS), alpha=float(alpha))
    if not fits_float32(stored, tuple(maxima)):  # the reader would refuse it
        raise TriLoRAFileError(path, prefix, R_TOO_LARGE.format("float32"))
    tensors[f"{prefix}.{ALPHA_PART}"] = alpha
    return float(alpha)
