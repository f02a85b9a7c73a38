"""Read PyTorch ``state_dict`` checkpoints as numpy arrays, without torch and without running pickled code.

A ``torch.save`` zip checkpoint holds ``<prefix>/data.pkl`` (the pickled dict) and one
``<prefix>/data/<key>`` record of raw bytes per storage. The pickle is read by an
unpickler that resolves only the few globals a plain state dict needs, so a
checkpoint that references anything else is refused before any of it runs.

Reading costs little until the data is wanted. Opening a checkpoint unpickles only its
``data.pkl`` and checks each tensor's view and storage against the archive's records. A
storage is inflated only when tensors are read from it, only as far as they reach, and only
if they hold as many elements as that span, so a file cannot make the reader inflate more
than it returns.
Legacy (pre-1.6, non-zip) checkpoints are read whole by torch's weights-only loader.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["Checkpoint", "CheckpointFormatError", "TensorRecord", "UnsafeCheckpointError", "load_state_dict",
           "open_checkpoint"]

# Element dtype of each storage class ``torch.save`` may name. BFloat16 has no numpy
# dtype, so its bits are read as uint16 and widened to float32 afterwards.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}

# A state dict's pickle holds about a hundred bytes per tensor; one declaring more than this is not one.
_MAX_PICKLE_BYTES = 256 * 2**20

# What a damaged archive or deflate stream raises while a record is read.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError)


class UnsafeCheckpointError(ValueError):
    """A checkpoint references code that is not a tensor or container, so it is refused unread."""


class CheckpointFormatError(ValueError):
    """A file that is not a well-formed ``torch.save`` state dict: damaged, truncated, or with impossible tensors."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class, naming the dtype its bytes are read as."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """A storage as the pickle declares it: its archive record, element dtype (file byte order) and length."""

    key: str
    dtype: np.dtype
    numel: int
    bfloat16: bool


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as its checkpoint declares it, not yet read: a strided view of a storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Turn raw bfloat16 bits (uint16) into float32 exactly: bfloat16 is the high half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_unused: Any) -> TensorRecord:
    """Record the view torch's ``_rebuild_tensor*`` would build; `_view_fault` checks it once its name is known."""
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor storage is {type(storage).__name__}, not a storage record")
    if not (isinstance(size, tuple) and isinstance(stride, tuple)):
        raise CheckpointFormatError(f"tensor size {size!r} or stride {stride!r} is not a tuple")
    return TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(data: TensorRecord, *_unused: Any) -> TensorRecord:
    """Unwrap an ``nn.Parameter``: only its data matters for a state dict."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


def _last_element(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """The storage index of a non-empty view's last element."""
    return offset + sum((n - 1) * s for n, s in zip(shape, stride))


def _view_fault(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], numel: int) -> str | None:
    """What is impossible about a view of `numel` storage elements, or None: a broadcast (zero-stride) view, one
    reaching past its storage, or one with more elements than its storage holds (overlapping strides)."""
    if not all(map(_is_count, (offset, *shape, *stride))):
        return f"has an offset {offset!r}, size {shape!r} or stride {stride!r} that is not a count"
    if len(shape) != len(stride):
        return f"has {len(shape)} sizes {shape} but {len(stride)} strides {stride}"
    if any(n > 1 and s == 0 for n, s in zip(shape, stride)):
        return f"has a zero stride (size {shape}, stride {stride}), a broadcast that no parameter is"
    size = math.prod(shape)
    if size == 0:
        return None
    last = _last_element(offset, shape, stride)
    if last >= numel:
        return f"(size {shape}, stride {stride}, offset {offset}) reaches element {last:,} of a storage of {numel:,}"
    if size > numel:
        return f"(size {shape}, stride {stride}) has {size:,} elements, more than its storage's {numel:,}"
    return None


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and records each storage the pickle declares."""

    def __init__(self, data: bytes, byteorder: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._byteorder = "<" if byteorder == "little" else ">"
        self._path = path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Return the stand-in for an allow-listed global; refuse everything else."""
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if not all(part.isidentifier() for part in (*module.split("."), name)):
            raise CheckpointFormatError(f"its pickle names {module!r}.{name!r}, which is no Python name: damaged?")
        raise _unsafe(self._path, [(module, name)])

    def persistent_load(self, pid: Any) -> _Storage:
        """Record the ``('storage', type, key, location, numel)`` declaration, once per key since views share it."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_count(pid[4])):
            raise CheckpointFormatError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = _STORAGE_DTYPES[storage_type.name].newbyteorder(self._byteorder)
        storage = _Storage(key, dtype, numel, storage_type.name == "BFloat16Storage")
        if self._storages.setdefault(key, storage) != storage:
            raise CheckpointFormatError(f"storage {key} is declared twice, differently")
        return storage


def _flat_state_dict(obj: Any, path: Path, tensor_type: type) -> dict[str, Any]:
    """Accept only a flat ``{name: tensor}`` mapping, so wrapped checkpoints are never silently guessed at."""
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, tensor_type) for k, v in obj.items()):
        return dict(obj)
    found = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise CheckpointFormatError(f"{path}: expected a flat state dict of tensors, found {found}")


class Checkpoint:
    """An open checkpoint: `tensors` maps each name to its declaration (a `TensorRecord`, or the array itself for
    a legacy file), and `read` turns declarations into arrays. Use it as a context manager."""

    def __init__(self, path: Path, tensors: dict[str, Any], archive: zipfile.ZipFile | None = None,
                 prefix: str = "") -> None:
        self.path = path
        self.tensors = tensors
        self._archive = archive
        self._prefix = prefix

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()

    def read(self, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`{name: contiguous array}` for some of `self.tensors`' values (under any names). Of each storage only the
        span its tensors reach is kept, and only if they hold at least as many elements, so that the reader never
        holds more than it returns."""
        by_storage: dict[str, list[str]] = collections.defaultdict(list)
        for name, record in tensors.items():
            if isinstance(record, TensorRecord) and record.size:
                by_storage[record.storage.key].append(name)
        out = {name: record if isinstance(record, np.ndarray) else _empty(record)
               for name, record in tensors.items()}
        for names in by_storage.values():
            records = [tensors[name] for name in names]
            start = min(r.offset for r in records)
            stop = max(_last_element(r.offset, r.shape, r.stride) for r in records) + 1
            used = sum(r.size for r in records)
            if stop - start > used:
                raise CheckpointFormatError(
                    f"{self.path}: the tensors {', '.join(map(repr, names[:3]))} hold {used:,} elements spread over "
                    f"{stop - start:,} of storage {records[0].storage.key}; refusing to inflate what no tensor uses")
            span = self._read_span(records[0].storage, start, stop, names[0])
            for name, record in zip(names, records):
                out[name] = _copy_view(span, record, start)
        return out

    def _read_span(self, storage: _Storage, start: int, stop: int, tensor: str) -> np.ndarray:
        """Elements `start:stop` of a storage, in the file's byte order; zipfile checks the CRC of a record read to
        its end."""
        record = f"{self._prefix}/data/{storage.key}"
        itemsize = storage.dtype.itemsize
        try:
            with self._archive.open(record) as file:
                file.seek(start * itemsize)
                raw = file.read((stop - start) * itemsize)
        except _ARCHIVE_ERRORS as error:
            raise CheckpointFormatError(f"{self.path}: tensor {tensor!r}: record {record} is damaged: {error}") \
                from None
        if len(raw) != (stop - start) * itemsize:
            raise CheckpointFormatError(f"{self.path}: tensor {tensor!r}: record {record} ends early")
        return np.frombuffer(raw, dtype=storage.dtype)


def _native(record: TensorRecord) -> np.dtype:
    return record.storage.dtype.newbyteorder("=")


def _empty(record: TensorRecord) -> np.ndarray:
    """A tensor without elements, which needs no storage data."""
    return np.zeros(record.shape, np.float32 if record.storage.bfloat16 else _native(record))


def _copy_view(span: np.ndarray, record: TensorRecord, start: int) -> np.ndarray:
    """Copy a checked view of a storage (`span` holds its elements from `start` on) into a contiguous native-order
    array, as torch's ``_rebuild_tensor*`` would view it."""
    view = np.lib.stride_tricks.as_strided(span[record.offset - start:], shape=record.shape,
                                           strides=[s * span.itemsize for s in record.stride], writeable=False)
    array = view.astype(_native(record), order="C")
    return _widen_bfloat16(array) if record.storage.bfloat16 else array


def _scan_pickle(data: bytes | io.BufferedReader, path: Path, what: str) -> list[tuple[str, str]]:
    """The globals a pickle names (as far as its opcodes show them, to name them in a refusal), after refusing a
    pickle that is not well-formed, so that damage is never mistaken for an unsafe reference."""
    names, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(tuple(arg.split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append((strings[-2], strings[-1]))
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError as error:
        raise CheckpointFormatError(f"{path}: {what} is not a complete pickle (damaged or truncated?): {error}") \
            from None
    return names


def _unsafe(path: Path, names: list[tuple[str, str]]) -> UnsafeCheckpointError:
    """The refusal of a file whose pickle references the globals `names`."""
    return UnsafeCheckpointError(
        f"refusing to load {path}: it references {', '.join(f'{m}.{n}' for m, n in names)}, which is not a tensor "
        "or a container; only plain state dicts are accepted"
    )


def _check_tensors(tensors: dict[str, TensorRecord], archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    """Check every tensor's view and storage declaration against the archive's records, before any is inflated."""
    file_size = path.stat().st_size
    for name, record in tensors.items():
        storage = record.storage
        member = f"{prefix}/data/{storage.key}"
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise CheckpointFormatError(f"{path}: tensor {name!r}: its storage record {member} is missing") from None
        declared = storage.numel * storage.dtype.itemsize
        if info.file_size != declared:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r}: storage {storage.key} declares {storage.numel:,} elements "
                f"({declared:,} bytes) but its record holds {info.file_size:,} bytes")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size > file_size:
            raise CheckpointFormatError(f"{path}: tensor {name!r}: record {member} claims {info.compress_size:,} bytes "
                                        f"of a {file_size:,}-byte file")
        fault = _view_fault(record.offset, record.shape, record.stride, storage.numel)
        if fault is not None:
            raise CheckpointFormatError(f"{path}: tensor {name!r}: its view {fault}")


def _open_zip(path: Path) -> Checkpoint:
    """Unpickle ``<prefix>/data.pkl`` with the restricted unpickler and check what it declares."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointFormatError(f"{path}: damaged zip archive: {error}") from None
    try:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path} is a zip archive but not a torch.save checkpoint: it has "
                                        f"{len(pickles)} <name>/data.pkl records, not one")
        prefix = pickles[0].removesuffix("/data.pkl")
        if archive.getinfo(pickles[0]).file_size > _MAX_PICKLE_BYTES:
            raise CheckpointFormatError(f"{path}: {pickles[0]} declares {archive.getinfo(pickles[0]).file_size:,} "
                                        f"bytes, more than any state dict's pickle")
        try:
            data = archive.read(pickles[0])
            names = set(archive.namelist())
            byteorder = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in names else "little"
        except (*_ARCHIVE_ERRORS, UnicodeDecodeError) as error:
            raise CheckpointFormatError(f"{path}: damaged zip archive: {error}") from None
        if byteorder.strip() not in ("little", "big"):
            raise CheckpointFormatError(f"{path}: unknown byte order {byteorder!r}")
        _scan_pickle(data, path, pickles[0])
        try:
            obj = _StateDictUnpickler(data, byteorder.strip(), path).load()
        except UnsafeCheckpointError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError, pickle.UnpicklingError) as error:
            raise CheckpointFormatError(f"{path}: {pickles[0]}: {error}") from None
        tensors = _flat_state_dict(obj, path, TensorRecord)
        _check_tensors(tensors, archive, prefix, path)
    except BaseException:
        archive.close()
        raise
    return Checkpoint(path, tensors, archive, prefix)


def _scan_legacy_pickles(path: Path) -> list[tuple[str, str]]:
    """The globals named by a legacy file's pickles: five (magic number, protocol, system info, the object, storage
    keys), or one for a plain pickle. Refuses one that breaks off or holds a byte that is no opcode."""
    names = []
    with path.open("rb") as file:
        for _ in range(5):
            if not file.read(1):
                break
            file.seek(-1, os.SEEK_CUR)
            names += _scan_pickle(file, path, "its pickle")
    return names


def _open_with_torch(path: Path) -> Checkpoint:
    """Read a legacy checkpoint with torch's weights-only loader, which also runs no pickled code."""
    names = _scan_legacy_pickles(path)
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"cannot read {path} without torch: it is a legacy (non-zip) PyTorch checkpoint; "
            "`pip install torch` reads legacy-format checkpoints"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unknown = [name for name in names if name not in _ALLOWED_GLOBALS]
        if unknown:
            raise _unsafe(path, unknown) from None
        reason = str(error).strip().partition("\n")[0]
        raise UnsafeCheckpointError(f"refusing to load {path}: torch's weights-only loader rejected it: {reason}") \
            from None
    except Exception as error:  # torch raises many types (RuntimeError, EOFError, ...) for a damaged file
        raise CheckpointFormatError(f"{path}: torch cannot read it as a legacy checkpoint: {type(error).__name__}: "
                                    f"{error}") from None
    tensors = _flat_state_dict(obj, path, torch.Tensor)
    for name, tensor in tensors.items():
        fault = _view_fault(tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
                            tensor.untyped_storage().nbytes() // tensor.element_size())
        if fault is not None:
            raise CheckpointFormatError(f"{path}: tensor {name!r}: its view {fault}")
    return Checkpoint(path, {
        name: (t.detach().float() if t.dtype == torch.bfloat16 else t.detach()).contiguous().numpy()
        for name, t in tensors.items()
    })


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a ``torch.save(state_dict)`` checkpoint, checking its declarations but reading no tensor data yet.

    Raises ``UnsafeCheckpointError`` if the pickle references anything beyond tensors and dicts, and
    ``CheckpointFormatError`` for a file that is damaged or declares impossible tensors; both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    with path.open("rb") as file:
        head = file.read(4)
    if zipfile.is_zipfile(path):
        return _open_zip(path)
    if head.startswith(b"PK"):
        raise CheckpointFormatError(f"{path}: damaged zip archive: its central directory is missing (truncated?)")
    if head[:1] != pickle.PROTO:
        raise CheckpointFormatError(f"{path} is neither a zip nor a pickle, so it is not a PyTorch checkpoint")
    return _open_with_torch(path)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a ``torch.save(state_dict)`` checkpoint as ``{name: contiguous numpy array}`` without executing it.

    Raises as `open_checkpoint` does. bfloat16 tensors come back as float32; every other dtype is kept.
    """
    with open_checkpoint(path) as checkpoint:
        return checkpoint.read(checkpoint.tensors)
