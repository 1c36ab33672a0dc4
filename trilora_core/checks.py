"""What an adapter file's tensors must be, checked where files are read (the trust boundary) and
written: factor dtypes, shapes without zero-sized dimensions, finite values, alpha in range, and a
delta W that fits float32. The reasons are shared by the reader and the writer, so users see one
wording; errors are TriLoRAFileError naming the file and the key."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import TriLoRAFileError
from .layer import TriLoRALayer
from .safetensors_io import SafetensorsReader

# Anything above this is a broken or hostile file, not a real scale (alpha / rank).
MAX_ALPHA = 1e6

FACTOR_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Read as well (ComfyUI reads them), up-cast to float32 at once: torch has little math for them.
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
READ_DTYPES = (*FACTOR_DTYPES, *FP8_DTYPES)
ALPHA_DTYPES = (*READ_DTYPES, "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
TORCH_FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_FACTOR_NDIM = 5  # [r, in, kd, kh, kw] for 3-D convs

# Reasons shared by the reader and the writer, so users see one wording.
R_NOT_FINITE = "contains NaN or infinite values"
R_FACTOR_DTYPE = "expected a float16, bfloat16, float32 or float64 tensor, got {}"
R_READ_DTYPE = "expected a float8, float16, bfloat16, float32 or float64 tensor, got {}"
R_ALPHA_VALUE = "expected a finite alpha > 0 and <= 1000000, got {}"
R_TOO_LARGE = "values too large: delta W overflows {}"
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def shape_str(shape: list[int] | torch.Size) -> str:
    return str(list(shape))


def alpha_ok(alpha: float) -> bool:
    return math.isfinite(alpha) and 0.0 < alpha <= MAX_ALPHA


def max_abs(tensor: Tensor) -> float:
    """max |entry|: NaN when there is a NaN, inf when an inf. One pass and no temporary, so it is
    also the finiteness check (isfinite costs about ten times as much)."""
    low, high = torch.aminmax(tensor.detach())
    return float(torch.maximum(-low, high))


def fits_float32(layer: TriLoRALayer, maxima: tuple[float, float, float] | None = None) -> bool:
    """Whether delta W and the partial products ComfyUI forms on the way to it ((alpha / r) * s,
    then U diag(s) (alpha / r)) surely fit in float32: finite factors alone do not make a finite
    patch. Bounded from max|entries| (``maxima`` of U, s, Vt where known), so no delta W is formed."""
    u, s, vt = maxima or tuple(max_abs(t) for t in (layer.u, layer.s, layer.vt))
    bound = abs(layer.scale) * s
    for factor in (u, vt * layer.rank):
        if not bound <= FLOAT32_MAX:  # checked before each product: never inf * 0
            return False
        bound *= factor
    return bound <= FLOAT32_MAX


class NamedReader:
    """An open file whose keys are seen under the names they are matched by: ComfyUI renames some
    files' keys before matching them (comfy/lora_convert.py), ``rename`` maps stored key -> name."""

    def __init__(self, reader: SafetensorsReader, rename: Mapping[str, str] | None) -> None:
        self.reader, self.path = reader, reader.path
        self.stored: dict[str, str] = {}
        for key in reader.keys():
            name = (rename or {}).get(key, key)
            if name in self.stored:
                raise TriLoRAFileError(self.path, key, f"names the same tensor as {self.stored[name]} ({name})")
            self.stored[name] = key

    def keys(self) -> list[str]:
        return sorted(self.stored)

    def shape(self, key: str) -> list[int]:
        return self.reader.shape(self.stored[key])

    def dtype_name(self, key: str) -> str:
        return self.reader.dtype_name(self.stored[key])

    def tensor(self, key: str) -> Tensor:
        return self.reader.tensor(self.stored[key])


class Validator:
    """Checks tensors of one open file, raising TriLoRAFileError with the key at fault (as stored)."""

    def __init__(self, reader: NamedReader) -> None:
        self.reader = reader
        self.path = reader.path

    def fail(self, key: str | None, reason: str) -> TriLoRAFileError:
        return TriLoRAFileError(self.path, self.reader.stored.get(key, key) if key is not None else None, reason)

    def factor_dtype(self, key: str) -> None:
        name = self.reader.dtype_name(key)
        if name not in READ_DTYPES:
            raise self.fail(key, R_READ_DTYPE.format(name))

    def no_zero_dims(self, key: str, shape: list[int]) -> None:
        if 0 in shape:
            raise self.fail(key, f"expected no zero-sized dimension, got shape {shape_str(shape)}")

    def finite_tensor(self, key: str, float32: bool = False) -> tuple[Tensor, float]:
        """The tensor and its max |entry|; float8 (and with ``float32`` float16 / bfloat16 too)
        up-cast to float32, which holds every value of those exactly."""
        tensor = self.reader.tensor(key)
        if self.reader.dtype_name(key) in FP8_DTYPES or (float32 and tensor.dtype != torch.float64):
            tensor = tensor.float()
        largest = max_abs(tensor)
        if not math.isfinite(largest):
            raise self.fail(key, R_NOT_FINITE)
        return tensor, largest

    def bounded(self, prefix: str, layer: TriLoRALayer, maxima=None) -> TriLoRALayer:
        if not fits_float32(layer, maxima):
            raise self.fail(prefix, R_TOO_LARGE.format("float32"))
        return layer

    def alpha(self, key: str | None, rank: int) -> float:
        """The layer's alpha; ``key`` None (no alpha tensor) means alpha = rank. Any numeric dtype,
        a scalar or a one-element tensor (shape [1]), as ComfyUI's ``.item()`` takes it."""
        if key is None:
            return float(rank)
        shape = self.reader.shape(key)
        if math.prod(shape) != 1:
            raise self.fail(key, f"expected a scalar, got shape {shape_str(shape)}")
        name = self.reader.dtype_name(key)
        if name not in ALPHA_DTYPES:
            raise self.fail(key, f"expected a numeric scalar, got {name}")
        value = float(self.reader.tensor(key).reshape(()).double().item())
        if not alpha_ok(value):
            raise self.fail(key, R_ALPHA_VALUE.format(repr(value)))
        return value
