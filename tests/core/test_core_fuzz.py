"""Fuzzing the file reader, the pack's trust boundary: TriLoRA files come from strangers.

Valid TriLoRA and LoRA files are built and then mutated: lying headers (shapes, dtypes, data
offsets, header length), huge declared shapes, missing, extra and renamed keys, bad metadata,
non-finite and overflowing values, random tensor bytes, truncation, appended junk and random
byte flips. Every file goes through both read_trilora and read_adapter_file under a per-case
timeout. Only two outcomes are allowed: a TriLoRAFileError naming the file, or a load that
equals what the file holds (checked against safetensors' own parse of the bytes) and keeps
every invariant of a layer. Anything else (another exception, a hang) fails the test.

- hypothesis drives structured mutations (shrinks a failure to its smallest file);
- atheris (libFuzzer, coverage-guided on trilora_core) mutates the bytes of valid seed files
  and builds headers from its input, in a child process;
- another child process checks that headers declaring huge tensors fail before any memory
  is taken (peak RSS, against a control that does allocate).

The default run is derandomized and short. A deeper, randomized search:

    TRILORA_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/core/test_core_fuzz.py -s -o timeout=3000

(N mutated files from hypothesis, N / 10 valid ones, N atheris runs at most 5 s per 1000).
The number of cases run is printed at the end of each test.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
import torch
from core_helpers import reference_delta
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from trilora_core import (
    MAX_ALPHA,
    TriLoRAFile,
    TriLoRAFileError,
    TriLoRALayer,
    read_adapter_file,
    read_trilora,
    write_trilora,
)
from trilora_core.canonical import is_canonical
from trilora_core.suffixes import LORA_NAMINGS, split_diff_key, split_lora_key, split_trilora_key

REPO = Path(__file__).resolve().parents[2]
_DEEP = os.environ.get("TRILORA_FUZZ_EXAMPLES")
MUTATED_EXAMPLES = int(_DEEP or 2000)
VALID_EXAMPLES = MUTATED_EXAMPLES // 10  # the oracle's sanity check on unmutated files
ATHERIS_RUNS = int(_DEEP or 6000)
CASE_TIMEOUT_S = 10.0

FUZZ = settings(
    max_examples=MUTATED_EXAMPLES,
    deadline=None,  # the per-case timeout below bounds each read instead
    derandomize=_DEEP is None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# safetensors dtype codes -> torch dtype
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
CODE_OF = {dtype: code for code, dtype in DTYPES.items()}
FACTOR_DTYPES = {DTYPES[c] for c in FLOAT_CODES}
# Codes a lying header may claim: exotic ones safetensors knows, and nonsense.
ODD_DTYPES = ("F8_E8M0", "F4", "F6_E2M3", "C64", "U16", "U32", "U64", "X", "", "f32", 5, None, ["F32"])

PREFIXES = (
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_te_text_model_encoder_layers_0_mlp_fc1",
    "diffusion_model.input_blocks.1.0.in_layers.2",
    "lora_unet_conv_in",
)
KERNELS = ((), (1,), (3,), (1, 1), (2, 2), (1, 2, 1))
SUFFIXES = (
    "trilora_u", "trilora_s", "trilora_vt", "alpha", "lora_up.weight", "lora_down.weight", "lora_A.weight",
    "lora_B.weight", "lora.up.weight", "hada_w1_a", "lokr_w1", "oft_blocks", "dora_scale", "diff",
    "lora_mid.weight", "weight", "a1.weight",
)  # fmt: skip
KEY_VOCAB = (
    *(f"{p}.{s}" for p in (*PREFIXES[:2], "lora_unet_other") for s in SUFFIXES),
    "", ".", "alpha", ".trilora_u", "trilora_s", "x.", "__metadata__", "a" * 300, "ü.trilora_u", "a b.lora_up.weight",
)
ODD_SHAPES = (
    [], [0], [1], [10**12], [10**6, 10**6], [2**63], [2**64 - 1], [2**32, 2**32], [3, 0, 10**15], [-1], [1.5],
    ["a"], None, "4", [[2]], [1] * 7,
)  # fmt: skip
ODD_OFFSETS = ([0, 10**15], [0], [0, 1, 2], [-8, 8], ["0", 8], None, [2**64, 2**64 + 4], [1.0, 5.0])
ODD_METADATA = (
    {"a": 1}, ["x"], "x", {"trilora_format": "2"}, {"k" * 1000: "v"}, {"a": None}, {}, {"": ""},
    {"ss_network_dim": "-1", "ss_network_alpha": "nan"}, {"__metadata__": {"a": "b"}},
)  # fmt: skip
SPECIAL_VALUES = (math.nan, math.inf, -math.inf, "max", "-max", "tiny", 0.0, 1e30, -1e30)


class CaseTimeout(BaseException):
    """BaseException, so that no ``except Exception`` in the reader can turn it into a file error."""


@contextlib.contextmanager
def case_timeout(seconds: float):
    """Raises CaseTimeout when the block runs longer than ``seconds`` (wall clock).

    pytest-timeout's own SIGALRM timer, if any, is put back with the time it had left.
    """

    def expire(signum, frame):
        raise CaseTimeout(f"one read took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def test_the_per_case_timeout_fires_and_restores_the_outer_timer() -> None:
    signal.setitimer(signal.ITIMER_REAL, 100.0)  # stands for pytest-timeout's timer
    try:
        with pytest.raises(CaseTimeout, match="more than 0.2 s"), case_timeout(0.2):
            time.sleep(5)
        remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert 99.0 < remaining <= 99.8, remaining


# --------------------------------------------------------------------------- safetensors bytes


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


@dataclass
class Blob:
    """A safetensors file as its parts, so that a header can be made to lie about its data."""

    entries: dict[str, object] = field(default_factory=dict)  # key -> header entry (any JSON when mutated)
    data: bytearray = field(default_factory=bytearray)
    metadata: object = None  # None: no __metadata__ entry

    def add(self, key: str, tensor: torch.Tensor) -> None:
        raw = tensor_bytes(tensor)
        self.entries[key] = {
            "dtype": CODE_OF[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [len(self.data), len(self.data) + len(raw)],
        }
        self.data += raw

    def remove(self, key: str) -> None:
        """Drops a tensor and its bytes, keeping the other offsets right."""
        start, end = self.entries.pop(key)["data_offsets"]
        del self.data[start:end]
        for other in self.well_formed():
            a, b = self.entries[other]["data_offsets"]
            if a >= end:
                self.entries[other]["data_offsets"] = [a - (end - start), b - (end - start)]

    def well_formed(self) -> list[str]:
        """Keys whose entry is still a dict with an int shape and two in-file int offsets."""
        out = []
        for key, e in self.entries.items():
            if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)):
                continue
            shape, offsets = e["shape"], e["data_offsets"]
            if all(type(d) is int and 0 <= d < 2**40 for d in shape) and len(offsets) == 2:
                if all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= len(self.data):
                    out.append(key)
        return out

    def tensor_keys(self, codes=None) -> list[str]:
        """Well-formed keys (whose dtype is in ``codes``)."""
        return [k for k in self.well_formed() if codes is None or self.entries[k].get("dtype") in codes]

    def encode(self) -> bytes:
        header = dict(self.entries)
        if self.metadata is not None:
            header["__metadata__"] = self.metadata
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        return len(encoded).to_bytes(8, "little") + encoded + bytes(self.data)


def build_valid(pick: Callable, kind: str) -> Blob:
    """A valid TriLoRA or LoRA file of 1-3 small layers; ``pick(options)`` makes each choice."""
    gen = torch.Generator().manual_seed(pick(range(2**16)))
    blob = Blob()
    prefixes = list(PREFIXES)
    naming = pick(LORA_NAMINGS)
    for _ in range(pick((1, 2, 3))):
        prefix = prefixes.pop(pick(range(len(prefixes))))
        out, inn, kernel, rank = pick(range(1, 7)), pick(range(1, 7)), pick(KERNELS), pick(range(1, 6))
        dtype = DTYPES[pick(FLOAT_CODES)]
        scale = pick((1.0, 1e-3, 30.0))
        if kind == "trilora":
            blob.add(f"{prefix}.trilora_u", (torch.randn(out, rank, generator=gen) * scale).to(dtype))
            blob.add(f"{prefix}.trilora_s", (torch.randn(rank, generator=gen) * scale).to(DTYPES[pick(FLOAT_CODES)]))
            blob.add(f"{prefix}.trilora_vt", (torch.randn(rank, inn, *kernel, generator=gen) * scale).to(dtype))
        else:
            up_shape = (out, rank, *([1] * len(kernel))) if kernel and pick((True, False)) else (out, rank)
            blob.add(prefix + naming.up, (torch.randn(*up_shape, generator=gen) * scale).to(dtype))
            blob.add(prefix + naming.down, (torch.randn(rank, inn, *kernel, generator=gen) * scale).to(dtype))
        if pick((True, False)):
            code = pick(("F32", "F16", "BF16", "F64", "I64", "I32", "U8"))
            value = pick((1, rank, 8, 100) if code[0] in "IU" else (1.0, 0.5, float(rank), 3.7, 1000.0))
            blob.add(f"{prefix}.alpha", torch.tensor(value, dtype=DTYPES[code]).reshape(pick(((), (1,), (1, 1)))))
    if pick((True, False)):
        blob.metadata = pick(({"trilora_format": "1", "ss_network_module": "trilora"}, {"note": "ü" * 10}))
    return blob


# --------------------------------------------------------------------------- mutations


def special_value(spec, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {"max": info.max, "-max": -info.max, "tiny": info.smallest_normal / 4}.get(spec, spec)


def mutate(blob: Blob, pick: Callable, integer: Callable, binary: Callable, ops: list[str]) -> bytes:  # noqa: C901 - the mutation dispatch table: one branch per mutation kind
    """Applies ``ops`` (names of MUTATIONS) to ``blob`` and returns the file's bytes."""
    raw = None
    for op in ops:
        keys = blob.tensor_keys()
        if op in HEADER_OPS:
            if not keys and op not in ("extra_key", "metadata"):
                continue
            key = pick(keys) if keys else None
            entry = blob.entries.get(key)
            if op == "shape_lie":
                entry["shape"] = pick(ODD_SHAPES) if pick((True, False)) else [integer(0, 9) for _ in range(integer(0, 6))]
            elif op == "huge_declared":  # shape and offsets agree with each other, not with the file
                start = entry["data_offsets"][0]
                entry["shape"] = pick(([10**6, 10**6], [10**12], [2**40, 1], [1, 10**6, 10**6]))
                entry["data_offsets"] = [start, start + math.prod(entry["shape"]) * 4]
            elif op == "reshape":  # a wrong shape that matches the data size
                shape = entry["shape"]
                n = math.prod(shape)
                entry["shape"] = pick(([n], [1, n], [n, 1], shape[::-1], [*shape, 1], [1, *shape], [n, 1, 1, 1, 1, 1]))
            elif op == "dtype_lie":
                entry["dtype"] = pick((*DTYPES, *ODD_DTYPES))
            elif op == "offsets_lie":
                a, b = entry["data_offsets"]
                other = blob.entries[pick(keys)]["data_offsets"]
                entry["data_offsets"] = pick((
                    [b, a], [a + 1, b + 1], [a - 1, b - 1], [a, b + 8], [a, a], [other[0], other[0] + b - a],
                    *ODD_OFFSETS,
                ))  # fmt: skip
            elif op == "drop_key":
                blob.remove(key)
            elif op == "drop_entry":  # the header forgets a tensor whose bytes stay
                del blob.entries[key]
            elif op == "extra_key":
                name = pick(KEY_VOCAB)
                shape = [integer(0, 5) for _ in range(integer(0, 5))]
                dtype = DTYPES[pick(tuple(DTYPES))]
                if dtype.is_floating_point:
                    values = torch.randn(shape, generator=torch.Generator().manual_seed(integer(0, 999)))
                else:
                    values = torch.randint(0, 2, shape)
                blob.add(name, values.to(dtype))
            elif op == "rename_key":
                blob.entries[pick(KEY_VOCAB)] = blob.entries.pop(key)
            elif op == "metadata":
                blob.metadata = pick(ODD_METADATA)
            elif op == "relayout":  # the same tensors, their bytes in another order: a valid file
                order = [k for k in keys if k in blob.well_formed()]
                chunks = {k: bytes(blob.data[slice(*blob.entries[k]["data_offsets"])]) for k in order}
                rest = [k for k in blob.entries if k not in chunks]
                if rest or sum(map(len, chunks.values())) != len(blob.data):
                    continue  # overlapping or partial regions: keep them as they are
                start = integer(0, len(order) - 1) if order else 0
                blob.data = bytearray()
                for k in order[start:] + order[:start]:
                    blob.entries[k]["data_offsets"] = [len(blob.data), len(blob.data) + len(chunks[k])]
                    blob.data += chunks[k]
            elif op in ("special_value", "fill_value", "random_bytes"):
                floats = blob.tensor_keys(FLOAT_CODES)
                key = pick(floats) if floats and op != "random_bytes" else key
                start, end = blob.entries[key]["data_offsets"]
                code = blob.entries[key]["dtype"]
                if op == "random_bytes" or code not in FLOAT_CODES or end == start:
                    blob.data[start:end] = binary(end - start)
                    continue
                dtype = DTYPES[code]
                count = (end - start) // dtype.itemsize
                end = start + count * dtype.itemsize
                if count == 0:
                    continue
                value = special_value(pick(SPECIAL_VALUES), dtype)
                values = torch.full((count,), value, dtype=torch.float64).to(dtype)
                if op == "special_value":  # one element
                    i = integer(0, count - 1)
                    values = torch.frombuffer(bytearray(blob.data[start:end]), dtype=dtype).clone()
                    values[i] = value
                blob.data[start:end] = tensor_bytes(values)
        else:
            raw = bytearray(blob.encode() if raw is None else raw)
            if not raw:
                continue
            if op == "flip":
                for _ in range(integer(1, 8)):
                    raw[integer(0, len(raw) - 1)] ^= integer(1, 255)
            elif op == "truncate":
                del raw[integer(0, len(raw) - 1) :]
            elif op == "append":
                raw += binary(integer(1, 64))
            elif op == "header_len":
                true_len = int.from_bytes(raw[:8], "little")
                new = pick((0, 1, true_len - 8, true_len + 8, true_len + 1, 2**64 - 1, len(raw), 99_999_999))
                raw[:8] = (new % 2**64).to_bytes(8, "little")
            raw = bytes(raw)
    return blob.encode() if raw is None else raw


HEADER_OPS = (
    "shape_lie", "huge_declared", "reshape", "dtype_lie", "offsets_lie", "drop_key", "drop_entry", "extra_key",
    "rename_key", "metadata", "relayout", "special_value", "fill_value", "random_bytes",
)  # fmt: skip
BYTE_OPS = ("flip", "truncate", "append", "header_len")  # after the header ops: they work on bytes


# --------------------------------------------------------------------------- the oracle


def reference_tensors(raw: bytes) -> dict[str, torch.Tensor] | None:
    """safetensors' own parse of the bytes, or None when it refuses them."""
    try:
        return safetensors.torch.load(raw)
    except Exception:
        return None


def check_layer(prefix: str, layer: TriLoRALayer) -> None:
    """The invariants of every layer a reader returns."""
    assert isinstance(prefix, str) and prefix, prefix
    assert isinstance(layer, TriLoRALayer)
    u, s, vt = layer.u, layer.s, layer.vt
    assert u.ndim == 2 and s.ndim == 1 and 2 <= vt.ndim <= 5, (prefix, u.shape, s.shape, vt.shape)
    assert u.shape[1] == s.shape[0] == vt.shape[0] >= 1, (prefix, u.shape, s.shape, vt.shape)
    assert 0 not in u.shape and 0 not in vt.shape, (prefix, u.shape, vt.shape)
    assert {u.dtype, s.dtype, vt.dtype} <= FACTOR_DTYPES, (prefix, u.dtype, s.dtype, vt.dtype)
    assert all(bool(torch.isfinite(t).all()) for t in (u, s, vt)), prefix
    assert math.isfinite(layer.alpha) and 0 < layer.alpha <= MAX_ALPHA, (prefix, layer.alpha)
    if math.prod(layer.weight_shape) <= 1 << 20:  # the patch ComfyUI forms in float32 is finite
        assert bool(torch.isfinite(layer.delta(torch.float32)).all()), prefix


def check_error(err: TriLoRAFileError, path: str) -> None:
    assert err.path == path and str(err).startswith(path + ": "), str(err)
    assert err.key is None or isinstance(err.key, str), repr(err.key)  # "" is a key a file may have
    assert isinstance(err.reason, str) and err.reason, repr(err.reason)


def check_trilora_load(loaded: TriLoRAFile, ref: dict[str, torch.Tensor]) -> None:
    """The layers are exactly the file's tensors (a TriLoRA file is never rewritten on read)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    check_diffs(loaded, ref)
    for key, tensor in ref.items():
        if split_diff_key(key):
            continue
        split = split_trilora_key(key)
        assert split is not None, f"loaded a file with the non-TriLoRA key {key!r}"
        groups.setdefault(split[0], {})[split[1]] = tensor
    assert set(loaded.layers) == set(groups)
    for prefix, parts in groups.items():
        layer = loaded.layers[prefix]
        for name, got in (("trilora_u", layer.u), ("trilora_s", layer.s), ("trilora_vt", layer.vt)):
            want = parts[name]
            want = want.float() if want.dtype in FP8 else want  # read as float32, which holds float8 exactly
            assert got.dtype == want.dtype and torch.equal(got, want), f"{prefix}.{name} differs from the file"
        alpha = float(parts["alpha"].reshape(()).item()) if "alpha" in parts else float(layer.rank)
        assert layer.alpha == alpha, (prefix, layer.alpha, alpha)


def safe_norm(tensor: torch.Tensor) -> float:
    """Frobenius norm without overflow in the squares (entries near 1e154 are valid float64)."""
    peak = float(tensor.double().abs().max())
    return 0.0 if peak == 0 else peak * float((tensor.double() / peak).norm())


LORA_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2,
             torch.float8_e4m3fn: 1e-4, torch.float8_e5m2: 1e-4}  # float8: up-cast exactly, then float32
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_diffs(loaded: TriLoRAFile, ref: dict[str, torch.Tensor]) -> None:
    """Full-weight diffs (P.diff / P.diff_b) come back as float32 copies of the file's values."""
    want = {k: t for k, t in ref.items() if split_diff_key(k)}
    assert set(loaded.diffs) == set(want)
    for key, tensor in want.items():
        assert loaded.diffs[key].dtype == torch.float32 and torch.equal(loaded.diffs[key], tensor.float()), key


def check_lora_load(loaded: TriLoRAFile, ref: dict[str, torch.Tensor]) -> None:
    """Each layer is canonical and has the LoRA pair's delta W (relative to the factors' size)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas = {}
    check_diffs(loaded, ref)
    for key, tensor in ref.items():
        if split_diff_key(key):
            continue
        split = split_lora_key(key)
        if split is not None:
            pairs.setdefault(split[0], {})[split[2]] = tensor
        else:
            assert key.endswith(".alpha"), f"loaded a file with the non-LoRA key {key!r}"
            alphas[key[: -len(".alpha")]] = float(tensor.reshape(()).item())
    assert set(loaded.layers) == set(pairs) and set(alphas) <= set(pairs)
    for prefix, sides in pairs.items():
        layer, up, down = loaded.layers[prefix], sides["up"], sides["down"]
        r = up.shape[1]
        # up-cast before the conversion: float32, float64 where a factor is float64
        assert layer.rank <= r and layer.dtype in (torch.float32, torch.float64) and is_canonical(layer), prefix
        scale = alphas.get(prefix, r) / r
        want = (scale * up.double().flatten(1) @ down.double().flatten(1)).reshape(up.shape[0], *down.shape[1:])
        size = scale * safe_norm(up) * safe_norm(down)
        error = float((reference_delta(layer) - want).norm())
        rtol = max(LORA_RTOL[up.dtype], LORA_RTOL[down.dtype], LORA_RTOL[layer.dtype])
        atol = scale * r * torch.finfo(layer.dtype).smallest_normal  # s below it is stored subnormal
        assert error <= rtol * size + atol, (prefix, error, size)


def check_file(path: str, raw: bytes, timeout: float | None = CASE_TIMEOUT_S) -> dict[str, TriLoRAFile | None]:
    """Reads ``path`` (holding ``raw``) with both readers; fails on any outcome but a
    TriLoRAFileError naming the file or a correct load. Returns {reader name: file or None}."""
    ref = reference_tensors(raw)
    results: dict[str, TriLoRAFile | None] = {}
    for reader in (read_trilora, read_adapter_file):
        try:
            with case_timeout(timeout) if timeout else contextlib.nullcontext():
                loaded = reader(path)
        except TriLoRAFileError as err:
            check_error(err, path)
            results[reader.__name__] = None
            continue
        assert ref is not None, f"{reader.__name__} loaded bytes that safetensors itself refuses"
        assert isinstance(loaded, TriLoRAFile) and loaded.layers
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.metadata.items())
        for prefix, layer in loaded.layers.items():
            check_layer(prefix, layer)
        if any(split_trilora_key(k) and not k.endswith(".alpha") for k in ref):
            check_trilora_load(loaded, ref)
        else:
            assert reader is read_adapter_file, "read_trilora loaded a file without TriLoRA factors"
            check_lora_load(loaded, ref)
        results[reader.__name__] = loaded
    trilora, adapter = results["read_trilora"], results["read_adapter_file"]
    if trilora is not None:  # a TriLoRA file: read_adapter_file reads it the same way
        assert adapter is not None and set(adapter.layers) == set(trilora.layers)
        for prefix, layer in trilora.layers.items():
            other = adapter.layers[prefix]
            assert all(torch.equal(a, b) for a, b in zip((layer.u, layer.s, layer.vt), (other.u, other.s, other.vt), strict=True))
            assert layer.alpha == other.alpha
    return results


# --------------------------------------------------------------------------- hypothesis


def draw_picker(draw):
    def pick(options):
        if isinstance(options, range):
            return draw(st.integers(options.start, options.stop - 1))
        return draw(st.sampled_from(tuple(options)))

    return pick


@st.composite
def valid_files(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(("trilora", "lora")))
    return kind, build_valid(draw_picker(draw), kind).encode()


@st.composite
def mutated_files(draw) -> tuple[list[str], bytes]:
    pick = draw_picker(draw)
    blob = build_valid(pick, pick(("trilora", "lora")))
    ops = draw(st.lists(st.sampled_from(HEADER_OPS), max_size=3))
    if draw(st.integers(0, 2)) == 0:  # most byte-level damage is fatal: keep room for subtler lies
        ops += draw(st.lists(st.sampled_from(BYTE_OPS), min_size=1, max_size=2, unique=True))
    if not ops:
        ops = [pick(HEADER_OPS + BYTE_OPS)]
    raw = mutate(
        blob,
        pick,
        lambda lo, hi: draw(st.integers(lo, max(lo, hi))),
        lambda n: draw(st.binary(min_size=n, max_size=n)),
        ops,
    )
    return ops, raw


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[fuzz] {text}")


def test_valid_files_load_exactly(tmp_path: Path, capsys) -> None:
    """The unmutated files are good: the oracle accepts them, so the mutated runs test something."""
    seen = Counter()

    @settings(FUZZ, max_examples=VALID_EXAMPLES)
    @given(valid_files())
    def run(case):
        kind, raw = case
        path = str(tmp_path / "valid.safetensors")
        Path(path).write_bytes(raw)
        results = check_file(path, raw)
        assert results["read_adapter_file"] is not None, "a valid file was refused"
        assert (results["read_trilora"] is not None) == (kind == "trilora")
        seen[kind] += 1

    run()
    report(capsys, f"valid files: {sum(seen.values())} cases, each read by both readers ({dict(seen)})")
    assert seen["trilora"] and seen["lora"]


def test_mutated_files_fail_cleanly_or_load_correctly(tmp_path: Path, capsys) -> None:
    outcomes: Counter = Counter()
    ops_seen: Counter = Counter()

    @FUZZ
    @given(mutated_files())
    def run(case):
        ops, raw = case
        path = str(tmp_path / "mutated.safetensors")
        Path(path).write_bytes(raw)
        results = check_file(path, raw)
        for name, loaded in results.items():
            outcomes[f"{name} {'loaded' if loaded is not None else 'refused'}"] += 1
        ops_seen.update(ops)

    run()
    cases = outcomes["read_adapter_file loaded"] + outcomes["read_adapter_file refused"]
    report(capsys, f"mutated files: {cases} cases, each read by both readers; outcomes {dict(outcomes)}")
    # The search reached both sides: refusals of every kind of lie and loads of benign mutations.
    assert set(ops_seen) == set(HEADER_OPS + BYTE_OPS), set(HEADER_OPS + BYTE_OPS) - set(ops_seen)
    for name in ("read_trilora", "read_adapter_file"):
        assert outcomes[f"{name} loaded"] >= cases // 100, outcomes
        assert outcomes[f"{name} refused"] >= cases // 2, outcomes


# --------------------------------------------------------------------------- atheris


def structured_file(fdp, consistent: bool) -> bytes:
    """A header built from the fuzzer's input: keys, dtypes, shapes, offsets and values."""
    blob = Blob()
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        key = KEY_VOCAB[fdp.ConsumeIntInRange(0, len(KEY_VOCAB) - 1)]
        codes = (*DTYPES, *ODD_DTYPES)
        code = codes[fdp.ConsumeIntInRange(0, len(codes) - 1)]
        shape = [fdp.ConsumeIntInRange(0, 6) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        if shape and not consistent and fdp.ConsumeIntInRange(0, 7) == 0:
            shape[fdp.ConsumeIntInRange(0, len(shape) - 1)] = fdp.ConsumeIntInRange(0, 2**64 - 1)
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        size = math.prod(shape) * (dtype.itemsize if dtype is not None else 4)
        if dtype is not None and dtype.is_floating_point and code in FLOAT_CODES and size <= 1 << 14:
            values = [fdp.ConsumeFloat() for _ in range(math.prod(shape))]
            raw = tensor_bytes(torch.tensor(values, dtype=torch.float64).to(dtype))
        else:
            raw = fdp.ConsumeBytes(min(size, 1 << 14))
        offsets = [len(blob.data), len(blob.data) + size]
        if not consistent and fdp.ConsumeIntInRange(0, 3) == 0:
            offsets = [fdp.ConsumeIntInRange(0, 1 << 16), fdp.ConsumeIntInRange(0, 1 << 16)]
        blob.entries[key] = {"dtype": code, "shape": shape, "data_offsets": offsets}
        blob.data += raw
    if fdp.ConsumeBool():
        blob.metadata = ODD_METADATA[fdp.ConsumeIntInRange(0, len(ODD_METADATA) - 1)]
    return blob.encode()


def atheris_main(argv: list[str]) -> None:
    """The libFuzzer target: runs in a child process (see ATHERIS_BOOT). Input byte 0 picks the
    mode: raw file bytes (mutated from the seed corpus), or a header built from the input."""
    import atheris

    work = Path(os.environ["TRILORA_FUZZ_DIR"])
    path = str(work / "case.safetensors")
    stats: Counter = Counter()

    def one_input(data: bytes) -> None:
        mode = data[0] % 4 if data else 0
        if mode < 2:
            raw = data[1:]
        else:
            raw = structured_file(atheris.FuzzedDataProvider(data[1:]), consistent=mode == 3)
        Path(path).write_bytes(raw)
        results = check_file(path, raw, timeout=None)  # libFuzzer's -timeout bounds each case
        stats["runs"] += 1
        stats["loaded"] += results["read_adapter_file"] is not None
        if stats["runs"] % 100 == 0:  # libFuzzer exits without running Python's atexit
            (work / "stats.json").write_text(json.dumps(stats))

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


# Instrument trilora_core (coverage feedback for libFuzzer) before this module imports it.
ATHERIS_BOOT = """
import sys, atheris
with atheris.instrument_imports(include=["trilora_core"]):
    import trilora_core
import test_core_fuzz
test_core_fuzz.atheris_main(sys.argv[1:])
"""


def test_atheris_coverage_guided_fuzzing(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in range(32):  # valid files to mutate, and a few mutated ones
        rng = random.Random(seed)
        blob = build_valid(lambda options, rng=rng: rng.choice(options), ("trilora", "lora")[seed % 2])
        (corpus / f"seed{seed}").write_bytes(b"\x00" + blob.encode())
    env = {**os.environ, "TRILORA_FUZZ_DIR": str(tmp_path), "PYTHONPATH": f"{REPO}{os.pathsep}{Path(__file__).parent}"}
    command = [
        sys.executable, "-c", ATHERIS_BOOT, f"-runs={ATHERIS_RUNS}", f"-max_total_time={5 * ATHERIS_RUNS // 1000 + 30}",
        f"-timeout={int(CASE_TIMEOUT_S)}", "-rss_limit_mb=3072", "-max_len=8192", "-seed=1",
        f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30 + ATHERIS_RUNS // 10)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"atheris found a failing input (kept in {tmp_path}):\n{log[-6000:]}"
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert done, log[-3000:]
    runs = int(done.group(1))
    stats = json.loads((tmp_path / "stats.json").read_text())
    peak = re.search(r"stat::peak_rss_mb:\s*(\d+)", log)
    report(capsys, f"atheris: {runs} cases in {done.group(2)} s, each read by both readers; "
           f"{stats['loaded']} of the first {stats['runs']} loaded; peak RSS {peak and peak.group(1)} MB")  # fmt: skip
    assert runs >= min(ATHERIS_RUNS, 1000), log[-3000:]
    assert 0 < stats["loaded"] < stats["runs"], stats


# --------------------------------------------------------------------------- memory


def sparse_file(path: Path, entries: dict, data_size: int) -> Path:
    """A safetensors file whose header says ``entries`` and whose data are ``data_size`` bytes
    of zeros that take no disk (a sparse file): honest sizes, nothing read unless asked."""
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + data_size)
    return path


def entry(dtype: str, shape: list[int], start: int, itemsize: int = 4) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, start + math.prod(shape) * itemsize]}


BIG = 2**27  # float32 elements: 512 MiB


def hostile_files(tmp_path: Path) -> list[Path]:
    """Headers that declare huge tensors: lying ones (more data than the file has), and honest
    ones whose layer is invalid by its shapes alone, so no tensor needs to be read to refuse it."""
    files = []

    def lie(name: str, entries: dict, data: bytes = b"\0" * 64):
        header = json.dumps(entries).encode()
        header += b" " * (-len(header) % 8)
        (tmp_path / name).write_bytes(len(header).to_bytes(8, "little") + header + data)
        files.append(tmp_path / name)

    lie("lie_1e12.safetensors", {"a.trilora_vt": entry("F32", [10**6, 10**6], 0)})
    lie("lie_1e12_offsets.safetensors", {"a.trilora_vt": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 64]}})
    lie("lie_overflow.safetensors", {"a.trilora_u": {"dtype": "F64", "shape": [2**62, 4], "data_offsets": [0, 64]}})
    lie("lie_alpha.safetensors", {"a.alpha": entry("F32", [10**12], 0)})
    lie("lie_lora.safetensors", {"a.lora_up.weight": entry("F32", [10**6, 10**6], 0),
                                 "a.lora_down.weight": entry("F32", [4, 4], 4 * 10**12)})  # fmt: skip
    lie("lie_header_len.safetensors", {})
    raw = (tmp_path / "lie_header_len.safetensors").read_bytes()
    (tmp_path / "lie_header_len.safetensors").write_bytes((99_999_999).to_bytes(8, "little") + raw[8:])

    def honest(name: str, entries: dict, size: int):
        files.append(sparse_file(tmp_path / name, entries, size))

    big = BIG * 4
    honest("ranks_disagree.safetensors", {"a.trilora_vt": entry("F32", [1, BIG], 0),
           "a.trilora_u": entry("F32", [4, 2], big), "a.trilora_s": entry("F32", [2], big + 32)}, big + 40)  # fmt: skip
    honest("missing_s.safetensors", {"a.trilora_vt": entry("F32", [2, BIG // 2], 0),
           "a.trilora_u": entry("F32", [4, 2], big)}, big + 32)  # fmt: skip
    honest("int_factor.safetensors", {"a.trilora_vt": entry("I32", [2, BIG // 2], 0),
           "a.trilora_u": entry("F32", [4, 2], big), "a.trilora_s": entry("F32", [2], big + 32)}, big + 40)  # fmt: skip
    honest("unknown_key.safetensors", {"a.weight": entry("F32", [BIG], 0), "a.trilora_u": entry("F32", [4, 2], big),
           "a.trilora_s": entry("F32", [2], big + 32), "a.trilora_vt": entry("F32", [2, 4], big + 40)}, big + 72)  # fmt: skip
    honest("big_alpha.safetensors", {"a.alpha": entry("F32", [BIG], 0), "a.trilora_u": entry("F32", [4, 2], big),
           "a.trilora_s": entry("F32", [2], big + 32), "a.trilora_vt": entry("F32", [2, 4], big + 40)}, big + 72)  # fmt: skip
    honest("lora_ranks_disagree.safetensors", {"a.lora_down.weight": entry("F32", [2, BIG // 2], 0),
           "a.lora_up.weight": entry("F32", [4, 3], big)}, big + 48)  # fmt: skip
    honest("loha.safetensors", {"a.hada_w1_a": entry("F32", [BIG], 0)}, big)
    return files


MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from trilora_core import TriLoRAFileError, read_adapter_file, read_trilora
def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))  # KiB
def reset_peak():  # Linux: the peak RSS (VmHWM, what getrusage's ru_maxrss reports) := the current RSS
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status("VmRSS")
def read(path):
    for reader in (read_trilora, read_adapter_file):
        try:
            reader(path)
        except TriLoRAFileError as err:
            yield reader.__name__, str(err)
        else:
            yield reader.__name__, None
warm, hostile, control = sys.argv[2], sys.argv[3:-1], sys.argv[-1]
list(read(warm))  # the first read loads lazy code; not counted
start = reset_peak()
results = {path: dict(read(path)) for path in hostile}
hostile_kib = status("VmHWM") - start
start = reset_peak()
control_result = dict(read(control))
print(json.dumps({"hostile_kib": hostile_kib, "control_kib": status("VmHWM") - start,
                  "results": results, "control": control_result}))
"""


def test_huge_declared_tensors_fail_before_taking_memory(tmp_path: Path, capsys) -> None:
    """The peak RSS of a fresh process reading the hostile files grows by less than 16 MiB; the
    same measurement sees the 64 MiB tensor of a control file that is really loaded."""
    gen = torch.Generator().manual_seed(0)
    warm = tmp_path / "warm.safetensors"
    save_file({"a.trilora_u": torch.randn(4, 2, generator=gen), "a.trilora_s": torch.rand(2, generator=gen),
               "a.trilora_vt": torch.randn(2, 4, generator=gen)}, str(warm))  # fmt: skip
    control = tmp_path / "control.safetensors"
    save_file({"a.trilora_u": torch.randn(4, 1, generator=gen), "a.trilora_s": torch.ones(1),
               "a.trilora_vt": torch.ones(1, 2**24)}, str(control))  # fmt: skip
    hostile = hostile_files(tmp_path)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(REPO), str(warm), *map(str, hostile), str(control)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    report(capsys, f"huge declared tensors: {len(hostile)} files, each read by both readers; peak RSS "
           f"+{out['hostile_kib']} KiB (control file with a 64 MiB tensor: +{out['control_kib']} KiB)")  # fmt: skip
    for path, results in out["results"].items():
        assert all(message and message.startswith(path + ": ") for message in results.values()), (path, results)
    assert out["control"] == {"read_trilora": None, "read_adapter_file": None}
    assert out["hostile_kib"] < 16 * 1024, out["hostile_kib"]
    assert out["control_kib"] > 48 * 1024, out["control_kib"]


# --------------------------------------------------------------------------- regressions


def test_lora_values_that_overflow_the_conversion_are_refused(tmp_path: Path) -> None:
    """Found by this fuzzer: finite but huge LoRA factors made read_adapter_file return NaN
    factors (or raise torch's LinAlgError) instead of a TriLoRAFileError."""
    cases = {
        "nan.safetensors": ({"a.lora_up.weight": torch.full((2, 1), 3e38),
                             "a.lora_down.weight": torch.full((1, 2), 3e38)}, "float32"),  # fmt: skip
        "linalg.safetensors": ({"a.lora_up.weight": torch.full((2, 2), 3e38),
                                "a.lora_down.weight": torch.full((2, 2), 3e38)}, "float32"),  # fmt: skip
    }
    for name, (tensors, dtype) in cases.items():
        path = str(tmp_path / name)
        save_file(tensors, path)
        with pytest.raises(TriLoRAFileError) as err:
            read_adapter_file(path)
        assert str(err.value) == f"{path}: a: values too large: delta W overflows {dtype}"


def test_half_lora_factors_are_converted_in_float32(tmp_path: Path) -> None:
    """float16 factors whose delta overflows float16 but not float32 (where ComfyUI forms its
    patches) load: the conversion runs on factors up-cast to float32."""
    path = str(tmp_path / "half.safetensors")
    half = torch.full((2, 2), 6e4, dtype=torch.float16)
    save_file({"a.lora_up.weight": half, "a.lora_down.weight": half.clone()}, path)
    layer = read_adapter_file(path).layers["a"]
    assert layer.dtype == torch.float32
    want = torch.full((2, 2), 2 * 6e4 * 6e4, dtype=torch.float64)
    torch.testing.assert_close(layer.delta(torch.float64), want, rtol=1e-5, atol=0)


def test_trilora_values_whose_patch_overflows_float32_are_refused(tmp_path: Path) -> None:
    """Found by this fuzzer: finite factors whose product (the patch ComfyUI adds to the weight,
    formed in float32) is infinite were loaded, and would have put infinite values into the weights."""
    path = str(tmp_path / "huge.safetensors")
    save_file({"a.trilora_u": torch.full((2, 2), 1e20), "a.trilora_s": torch.full((2,), 1e20),
               "a.trilora_vt": torch.ones(2, 2)}, path)  # fmt: skip
    for reader in (read_trilora, read_adapter_file):
        with pytest.raises(TriLoRAFileError) as err:
            reader(path)
        assert str(err.value) == f"{path}: a: values too large: delta W overflows float32"
    # just inside the bound: (alpha / r) * r * max|u| * max|s| * max|vt| = 2 * 1e19 * 1e19 = 2e38
    save_file({"a.trilora_u": torch.full((2, 2), 1e19), "a.trilora_s": torch.full((2,), 1e19),
               "a.trilora_vt": torch.ones(2, 2)}, path)  # fmt: skip
    layer = read_trilora(path).layers["a"]
    assert bool(torch.isfinite(layer.delta()).all())
    # The writer refuses what the reader would refuse, and leaves the old file alone.
    before = Path(path).read_bytes()
    huge = TriLoRALayer(torch.full((2, 2), 1e20), torch.full((2,), 1e20), torch.ones(2, 2), 2.0)
    with pytest.raises(TriLoRAFileError) as err:
        write_trilora(path, {"a": huge}, canonical=False)
    assert str(err.value) == f"{path}: a: values too large: delta W overflows float32"
    assert Path(path).read_bytes() == before and os.listdir(tmp_path) == ["huge.safetensors"]
