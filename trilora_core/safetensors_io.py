"""Safe, checked access to safetensors files: header sanity, error wrapping, atomic writes,
and the kohya-style content hash."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from types import TracebackType

import safetensors.torch
from safetensors import safe_open
from torch import Tensor

from .errors import TriLoRAFileError

# safetensors refuses headers above 100 MB too; checking first avoids reading a huge one.
MAX_HEADER_BYTES = 100_000_000
_HASH_BLOCK = 1 << 20

DTYPE_NAMES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}


def check_header(path: str) -> None:
    """Cheap checks on the first bytes, before safetensors parses anything."""
    try:
        size = os.path.getsize(path)
        if os.path.isdir(path):
            raise TriLoRAFileError(path, None, "not a file")
        with open(path, "rb") as fh:
            head = fh.read(9)
    except FileNotFoundError:
        raise TriLoRAFileError(path, None, "file not found") from None
    except IsADirectoryError:
        raise TriLoRAFileError(path, None, "not a file") from None
    except OSError as err:
        raise TriLoRAFileError(path, None, f"cannot read the file ({err.strerror or err})") from err
    header_len = int.from_bytes(head[:8], "little")
    if len(head) == 9 and header_len <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{":
        return
    # Only now look for pickle signatures: a valid header length may start with the same bytes.
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise TriLoRAFileError(
            path,
            None,
            "not a safetensors file (it looks like a pickled PyTorch checkpoint; "
            "only .safetensors files are supported)",
        )
    if len(head) < 9:
        raise TriLoRAFileError(path, None, "not a safetensors file (too short)")
    raise TriLoRAFileError(path, None, "not a safetensors file (invalid header)")


class SafetensorsReader:
    """A safetensors file opened on the CPU; every failure becomes a TriLoRAFileError.

    Shapes and dtypes come from the header (already checked by safetensors against the file
    size), so they can be validated before any tensor data is read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        check_header(self.path)
        try:
            self._handle = safe_open(self.path, framework="pt", device="cpu")
            self._file = self._handle.__enter__()
            self._keys = list(self._file.keys())
            self._metadata = dict(self._file.metadata() or {})
        except Exception as err:
            raise TriLoRAFileError(self.path, None, f"corrupt safetensors file ({err})") from err

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Release the memory map promptly (Windows cannot replace a mapped file).
        self._handle.__exit__(exc_type, exc, tb)

    def keys(self) -> list[str]:
        return list(self._keys)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> list[int]:
        return self._guard(key, lambda: list(self._file.get_slice(key).get_shape()))

    def dtype_name(self, key: str) -> str:
        code = self._guard(key, lambda: self._file.get_slice(key).get_dtype())
        return DTYPE_NAMES.get(code, code.lower())

    def tensor(self, key: str) -> Tensor:
        return self._guard(key, lambda: self._file.get_tensor(key))

    def _guard(self, key: str, read):
        try:
            return read()
        except Exception as err:
            raise TriLoRAFileError(self.path, key, f"cannot read the tensor ({err})") from err


def serialize(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> bytes:
    """safetensors bytes with a deterministic header.

    safetensors writes metadata in hash-map order, which changes from call to call; the
    header is re-encoded with sorted keys so the same content always gives the same file.
    The tensor data (and its offsets) are untouched.
    """
    raw = safetensors.torch.save(tensors, metadata=metadata)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(encoded).to_bytes(8, "little") + encoded + raw[8 + header_len :]


def data_hash(serialized: bytes) -> str:
    """sha256 of the tensor data (the bytes after the 8-byte length and the JSON header), as
    kohya's sshs_model_hash: metadata edits do not change it."""
    header_len = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(memoryview(serialized)[8 + header_len :]).hexdigest()


def content_hash(tensors: dict[str, Tensor]) -> str:
    """The sshs_model_hash a file holding exactly ``tensors`` gets."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    return data_hash(serialize(tensors, None))


def file_content_hash(path: str | os.PathLike[str]) -> str:
    """sshs_model_hash of a safetensors file on disk, streamed."""
    path = os.fspath(path)
    check_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _current_umask() -> int:
    # os.umask can only be read by setting it, which races with other threads; Linux exposes it.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    A temp file in the same directory is written, flushed, fsynced and renamed over ``path``;
    on any failure the temp file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), so best effort.
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
