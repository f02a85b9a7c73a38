"""Read PyTorch ``state_dict`` checkpoints as numpy arrays, without torch and without running pickled code.

A ``torch.save`` zip checkpoint holds ``<prefix>/data.pkl`` (the pickled dict) and one
``<prefix>/data/<key>`` record of raw bytes per storage. The pickle is read by an
unpickler that resolves only the few globals a plain state dict needs, so a
checkpoint that references anything else is refused before any of it runs.
Legacy (pre-1.6, non-zip) checkpoints are handed to torch's weights-only loader.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafeCheckpointError", "load_state_dict"]

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


class UnsafeCheckpointError(ValueError):
    """A checkpoint references code that is not a tensor or container, so it is refused unread."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class, naming the dtype its bytes are read as."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """One storage's elements as a flat native-order array; bfloat16 is kept as raw uint16 bits."""

    data: np.ndarray
    bfloat16: bool


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Turn raw bfloat16 bits (uint16) into float32 exactly: bfloat16 is the high half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_unused: Any) -> np.ndarray:
    """Copy a (possibly strided, offset) view of a storage into a contiguous array, as torch's ``_rebuild_tensor*``."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor storage is {type(storage).__name__}, not a storage record")
    numbers = (storage_offset, *size, *stride)
    if len(size) != len(stride) or any(type(n) is not int or n < 0 for n in numbers):
        raise ValueError(f"bad tensor view: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    # as_strided does no bounds checking, so make sure the view stays inside the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and last >= storage.data.size:
        raise ValueError(f"tensor view reaches element {last} of a storage of {storage.data.size}")
    itemsize = storage.data.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[storage_offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
    )
    array = np.array(view, copy=True, order="C")
    return _widen_bfloat16(array) if storage.bfloat16 else array


def _rebuild_parameter(data: np.ndarray, *_unused: Any) -> np.ndarray:
    """Unwrap an ``nn.Parameter``: only its data matters for a state dict."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and reads storages from the checkpoint zip."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: Path) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._path = path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Return the stand-in for an allow-listed global; refuse everything else."""
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._path}: it references {module}.{name}, which is not a tensor "
                "or a container; only plain state dicts are accepted"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        """Read the ``('storage', type, key, location, numel)`` record, once per key since views share it."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            dtype = _STORAGE_DTYPES[storage_type.name].newbyteorder(self._byteorder)
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            if len(raw) != numel * dtype.itemsize:
                raise ValueError(f"storage {key} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
            data = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
            self._storages[key] = _Storage(data, storage_type.name == "BFloat16Storage")
        return self._storages[key]


def _flat_state_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    """Accept only a flat ``{name: array}`` mapping, so wrapped checkpoints are never silently guessed at."""
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        return dict(obj)
    found = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise ValueError(f"{path}: expected a flat state dict of tensors, found {found}")


def _load_zip(archive: zipfile.ZipFile, prefix: str, path: Path) -> dict[str, np.ndarray]:
    """Unpickle ``<prefix>/data.pkl`` with the restricted unpickler."""
    names = set(archive.namelist())
    byteorder_record = f"{prefix}/byteorder"
    byteorder = archive.read(byteorder_record).decode().strip() if byteorder_record in names else "little"
    if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byte order {byteorder!r}")
    try:
        obj = _StateDictUnpickler(archive, prefix, byteorder, path).load()
    except UnsafeCheckpointError:
        raise
    except (ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: corrupt checkpoint: {error}") from error
    return _flat_state_dict(obj, path)


def _load_with_torch(path: Path, what: str) -> dict[str, np.ndarray]:
    """Read a checkpoint this module cannot parse with torch's weights-only loader, which also runs no pickled code."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"cannot read {path} without torch: it is {what}; `pip install torch` reads legacy-format checkpoints"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: torch's weights-only loader rejected it: {error}"
        ) from error
    if isinstance(obj, dict):
        obj = {
            k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).contiguous().numpy()
            if isinstance(v, torch.Tensor) else v
            for k, v in obj.items()
        }
    return _flat_state_dict(obj, path)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a ``torch.save(state_dict)`` checkpoint as ``{name: contiguous numpy array}`` without executing it.

    Raises ``UnsafeCheckpointError`` if the pickle references anything beyond tensors and dicts.
    bfloat16 tensors come back as float32; every other dtype is kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no checkpoint file", str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) == 1:
                return _load_zip(archive, pickles[0].removesuffix("/data.pkl"), path)
        return _load_with_torch(path, "a zip without a single <prefix>/data.pkl record")
    with path.open("rb") as file:
        if file.read(1) != pickle.PROTO:
            raise ValueError(f"{path} is neither a zip nor a pickle, so it is not a PyTorch checkpoint")
    return _load_with_torch(path, "a legacy (non-zip) PyTorch checkpoint")
