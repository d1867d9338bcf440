"""A GGUF file's metadata, read in pure Python before llama.cpp sees the file.

llama.cpp refuses a truncated file or a damaged structure with an error, but it trusts a few
metadata values: a block count above its layer limit or a negative norm epsilon abort the whole
process (a failed GGML_ASSERT), and llama-cpp-python allocates one int per training-context token
whenever it tokenizes. ``metadata_problem`` finds such values first, so the user gets one clear
error instead of a crashed app. ``check_gguf_file`` runs all the checks a model file gets before it loads.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from engine.runtime.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # llama.cpp no longer reads version 1
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
MAX_CONTEXT_LENGTH = 1 << 24  # 16M tokens: a 64 MB token buffer per tokenize call
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.calcsize("<Q")


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata key/values (arrays as None: nothing checked here needs them).

    Raises ValueError saying where the structure breaks (the file ends inside it, an unknown type,
    an unsupported version), OSError if the file cannot be read.
    """
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        reader = _Reader(buffer)
        if reader.read(4) != GGUF_MAGIC:
            raise ValueError("it does not start with 'GGUF'")
        version = reader.scalar("<I")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version}; this app reads versions {SUPPORTED_VERSIONS}")
        reader.scalar("<Q")  # the tensor count: llama.cpp checks the tensor table itself
        count = reader.scalar("<Q")
        metadata = {}
        for _ in range(count):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<I"), key)
        return metadata


def metadata_problem(metadata: dict[str, Any]) -> str | None:
    """What is wrong with the values llama.cpp trusts, as 'its KEY is VALUE, expected ...', or None."""
    architecture = metadata.get("general.architecture")
    whole_numbers = {
        f"{architecture}.block_count": (1, MAX_LAYERS),
        f"{architecture}.context_length": (1, MAX_CONTEXT_LENGTH),
    }
    for key, (low, high) in whole_numbers.items():
        value = metadata.get(key)
        if key in metadata and not (isinstance(value, int) and low <= value <= high):
            return f"its {key} is {value!r}, expected a whole number from {low} to {high}"
    for key, value in metadata.items():
        if key.endswith("epsilon") and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            return f"its {key} is {value!r}, expected a finite number >= 0"
    return None


class _Reader:
    """Little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self._buffer = buffer
        self._offset = 0

    def skip(self, size: int) -> None:
        if size > len(self._buffer) - self._offset:
            raise ValueError(f"it ends at byte {len(self._buffer)}, inside its metadata")
        self._offset += size

    def read(self, size: int) -> bytes:
        start = self._offset
        self.skip(size)
        return self._buffer[start : self._offset]

    def scalar(self, layout: str) -> Any:
        start = self._offset
        self.skip(struct.calcsize(layout))
        return struct.unpack_from(layout, self._buffer, start)[0]

    def string(self) -> str:
        return self.read(self.scalar("<Q")).decode("utf-8", errors="replace")  # llama.cpp takes any bytes

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            self._skip_array(key)
            return None
        raise ValueError(f"the value of {key} has the unknown type {kind}")

    def _skip_array(self, key: str) -> None:
        kind, count = self.scalar("<I"), self.scalar("<Q")
        if kind in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[kind]))
        elif kind == _STRING:
            if count > (len(self._buffer) - self._offset) // _LENGTH:  # else a damaged count loops for ages
                raise ValueError(f"its array {key} holds more strings than the file has bytes for")
            for _ in range(count):
                self.skip(self.scalar("<Q"))
        else:
            raise ValueError(f"its array {key} has elements of the unsupported type {kind}")


def check_gguf_file(path: Path) -> Path:
    """Checks before llama.cpp sees the file: a precise message, and no values that crash llama.cpp."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"Model file not found: {path}. Give the path of a .gguf file, or 'default'.")
    if not path.is_file():
        raise ModelFileError(f"{path} is a folder, not a model file; give the path of a .gguf file inside it.")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                f"{path} is not a GGUF model (it does not start with 'GGUF'); convert it to GGUF or pick another file."
            )
        problem = metadata_problem(read_metadata(path))
    except OSError as error:
        raise ModelFileError(f"Cannot read the model file {path}: {error.strerror}.") from error
    except ValueError as error:  # the metadata's structure is broken
        raise ModelFileError(
            f"The model {path} could not load: the file is truncated, corrupt, or not a GGUF "
            f"model ({error}). Re-download it or pick another GGUF."
        ) from error
    if problem:
        raise ModelFileError(f"The model {path} is damaged: {problem}. Re-download it or pick another GGUF.")
    return path
