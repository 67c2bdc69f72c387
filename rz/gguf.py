"""A memory-mapped GGUF reader: metadata, a tensor table, and zero-copy views of tensor bytes.

Every malformed input ends in rz.GGUFError naming the file and the problem; the reader checks
each length against the bytes that remain before it reads or allocates anything, so a corrupt
count can neither crash the interpreter nor make it allocate gigabytes.
"""

import enum
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rz.errors import GGUFError
from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 4


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}

_NUMPY_DTYPES = {
    ValueType.UINT8: np.uint8,
    ValueType.INT8: np.int8,
    ValueType.UINT16: np.uint16,
    ValueType.INT16: np.int16,
    ValueType.UINT32: np.uint32,
    ValueType.INT32: np.int32,
    ValueType.FLOAT32: np.float32,
    ValueType.BOOL: np.bool_,
    ValueType.UINT64: np.uint64,
    ValueType.INT64: np.int64,
    ValueType.FLOAT64: np.float64,
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. shape is in NumPy order: GGML's ne reversed."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Reads little-endian GGUF fields from a buffer, checking every length against what remains."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer = buffer
        self.pos = 0
        self.path = path

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    def remaining(self) -> int:
        return len(self.buffer) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise self.fail(
                f"truncated header: {what} needs {n} bytes at offset {self.pos}, "
                f"but only {self.remaining()} remain"
            )
        view = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        raw = self.take(length, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8 ({error.reason} at byte {error.start})") from None

    def value_type(self, what: str) -> ValueType:
        code = self.u32(f"type of {what}")
        try:
            return ValueType(code)
        except ValueError:
            raise self.fail(f"{what} has unknown metadata value type {code}") from None

    def value(self, vtype: ValueType, what: str, depth: int = 0) -> Any:
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype == ValueType.ARRAY:
            return self.array(what, depth)
        return self.scalar(_SCALAR_FORMATS[vtype], what)

    def array(self, what: str, depth: int) -> Any:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_NESTING}")
        element_type = self.value_type(f"elements of {what}")
        count = self.u64(f"length of {what}")
        if element_type in _NUMPY_DTYPES:
            dtype = np.dtype(_NUMPY_DTYPES[element_type]).newbyteorder("<")
            raw = self.take(count * dtype.itemsize, f"{count} elements of {what}")
            return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        # Each string or nested array takes at least 8 bytes (its length): a count that cannot
        # fit in the remaining bytes is rejected before the loop, not discovered after it.
        if count * 8 > self.remaining():
            raise self.fail(f"truncated header: {what} claims {count} elements, more than the file holds")
        if element_type == ValueType.STRING:
            return self.string_array(count, what)
        return [self.value(element_type, f"{what}[{i}]", depth + 1) for i in range(count)]

    def string_array(self, count: int, what: str) -> list[str]:
        # A vocabulary holds hundreds of thousands of strings: this loop is the reader's hot path.
        buffer, pos, end = self.buffer, self.pos, len(self.buffer)
        unpack_length = struct.Struct("<Q").unpack_from
        strings = []
        for index in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail(f"truncated header: {what}[{index}] runs past the end of the file")
            (length,) = unpack_length(buffer, pos)
            pos += 8
            if length > end - pos:
                self.pos = pos
                raise self.fail(f"truncated header: {what}[{index}] runs past the end of the file")
            try:
                strings.append(str(buffer[pos : pos + length], "utf-8"))
            except UnicodeDecodeError as error:
                raise self.fail(f"{what}[{index}] is not valid UTF-8 ({error.reason})") from None
            pos += length
        self.pos = pos
        return strings


class GGUFFile:
    """An open GGUF file: .metadata, .tensors, and tensor_bytes(name) views into the mapping."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = _map_file(self.path)
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise

    def _parse(self) -> None:
        cursor = _Cursor(memoryview(self._map), self.path)
        magic = bytes(cursor.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise cursor.fail(f"bad magic {magic!r}: not a GGUF file (expected {GGUF_MAGIC!r})")
        self.version = cursor.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version.to_bytes(4, "little")[0] == 0 else ""
            raise cursor.fail(
                f"unsupported GGUF version {self.version}{hint}; rz reads versions {SUPPORTED_VERSIONS}"
            )
        n_tensors = cursor.u64("tensor count")
        n_metadata = cursor.u64("metadata count")
        # The smallest metadata entry and tensor entry take well over 8 bytes each.
        if (n_tensors + n_metadata) * 8 > cursor.remaining():
            raise cursor.fail(
                f"truncated header: {n_tensors} tensors and {n_metadata} metadata entries "
                "cannot fit in the file"
            )
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, ValueType] = {}
        for index in range(n_metadata):
            key = cursor.string(f"metadata key #{index}")
            vtype = cursor.value_type(f"metadata {key!r}")
            self.metadata[key] = cursor.value(vtype, f"metadata {key!r}")
            self.metadata_types[key] = vtype
        self.alignment = self._alignment(cursor)
        entries = [_read_tensor_entry(cursor, index) for index in range(n_tensors)]
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, shape, relative_offset in entries:
            self.tensors[name] = self._check_tensor(cursor, name, ggml_type, shape, relative_offset)

    def _alignment(self, cursor: _Cursor) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment must be a power of two, got {alignment!r}")
        return alignment

    def _check_tensor(self, cursor, name, ggml_type, shape, relative_offset) -> TensorInfo:
        if name in self.tensors:
            raise cursor.fail(f"tensor {name!r} appears twice in the tensor table")
        if relative_offset % self.alignment:
            raise cursor.fail(f"tensor {name!r} offset {relative_offset} is not aligned to {self.alignment}")
        geometry = BLOCK_GEOMETRY[ggml_type]
        if shape[-1] % geometry.block_size:
            raise cursor.fail(
                f"tensor {name!r} of type {ggml_type.name} has a row of {shape[-1]} elements, "
                f"not a multiple of its block size {geometry.block_size}"
            )
        n_elements = int(np.prod(shape, dtype=object))
        nbytes = n_elements // geometry.block_size * geometry.type_size
        offset = self.data_offset + relative_offset
        if offset + nbytes > len(self._map):
            raise cursor.fail(
                f"tensor {name!r} ({nbytes} bytes at offset {offset}) extends past the end of the "
                f"file ({len(self._map)} bytes): truncated tensor data"
            )
        return TensorInfo(name, ggml_type, shape, offset, nbytes)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor: a read-only uint8 view into the mapping, nothing copied."""
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """A metadata value the model cannot do without; GGUFError naming the key when absent."""
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing required metadata {key!r}")
        return self.metadata[key]

    @property
    def file_size(self) -> int:
        return len(self._map)

    def release_tensor_pages(self, name: str) -> None:
        """release_pages for the whole pages inside one tensor's bytes: the loader calls it once it
        has copied the tensor, so that the file's pages and the loaded weights are never both
        resident for the whole model (a load's peak would be twice the weights)."""
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = -(-info.offset // page) * page
        self._release(start, (info.offset + info.nbytes) // page * page - start)

    def release_pages(self) -> None:
        """Drop the mapping's pages from this process's resident memory (they stay in the page
        cache, and any view still in use reads them back on its next access).

        Loading copies every tensor into the layout the kernels read, after which the mapped
        pages are a second copy of the weights counted against the process.
        """
        self._release(0, len(self._map) if not self._map.closed else 0)

    def _release(self, start: int, length: int) -> None:
        """MADV_DONTNEED on [start, start + length) of the mapping, page-aligned, where the OS has it."""
        if hasattr(mmap, "MADV_DONTNEED") and not self._map.closed and length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)

    def close(self) -> None:
        # Views returned by tensor_bytes keep the mapping alive; closing then would fail, and
        # the mapping is released when the last of them goes away.
        try:
            self._map.close()
        except BufferError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _map_file(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as file:
            if file.seek(0, 2) == 0:
                raise GGUFError(f"{path}: the file is empty, not a GGUF file")
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise GGUFError(f"{path}: cannot open: {error.strerror or error}") from error


def _read_tensor_entry(cursor: _Cursor, index: int):
    name = cursor.string(f"name of tensor #{index}")
    n_dims = cursor.u32(f"dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
    ne = [cursor.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
    if any(n == 0 for n in ne) or any(n >= 2**62 for n in ne):
        raise cursor.fail(f"tensor {name!r} has an invalid shape {ne}")
    type_code = cursor.u32(f"type of tensor {name!r}")
    try:
        ggml_type = GGMLType(type_code)
    except ValueError:
        raise cursor.fail(f"tensor {name!r} has unknown tensor type {type_code}") from None
    if ggml_type not in BLOCK_GEOMETRY:
        raise cursor.fail(f"tensor {name!r} has tensor type {ggml_type.name}, which rz cannot read")
    relative_offset = cursor.u64(f"data offset of tensor {name!r}")
    return name, ggml_type, tuple(reversed(ne)), relative_offset
