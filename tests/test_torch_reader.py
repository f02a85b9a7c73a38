"""Tests for vdvae_sr_jax.torch_reader: exact round trips of torch checkpoints and refusal of unsafe pickles."""

from __future__ import annotations

import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vdvae_sr_jax.torch_reader import UnsafeCheckpointError, load_state_dict

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Check keys, shapes, dtypes and values match exactly and every array is contiguous."""
    assert list(got) == list(want)
    for key, expected in want.items():
        assert isinstance(got[key], np.ndarray), key
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        assert got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], expected, err_msg=key)


def _to_numpy(tensor) -> np.ndarray:
    """torch's own view of a tensor as a numpy array (bfloat16 widened to float32, like the reader)."""
    import torch

    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy()


# Hand-written pickle opcodes, so crafted checkpoints need neither torch nor its classes.
def _global(module: str, name: str) -> bytes:
    """GLOBAL opcode naming module.name."""
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    """BINUNICODE opcode for a string."""
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _int(value: int) -> bytes:
    """BININT opcode for a signed 32-bit integer."""
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    """MARK ... TUPLE around the given opcodes."""
    return b"(" + b"".join(items) + b"t"


def _tensor(key: str, numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """Opcodes for ``_rebuild_tensor_v2`` over float32 storage ``key``."""
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"), _int(numel)) + b"Q"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _write_zip(path: Path, data_pkl: bytes, records: dict[str, bytes], byteorder: str = "little") -> Path:
    """Write a zip laid out like ``torch.save`` output under the prefix ``archive/``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", byteorder)
        for key, raw in records.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


class _RunsShell:
    """Pickles as a call to ``os.system`` that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


class _RunsEval:
    """Pickles as a call to ``builtins.eval`` that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A ``torch.save``d state dict of assorted dtypes and views, with torch's own values for it."""
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state = {
        "f32": torch.randn(3, 5),
        "f64": torch.randn(2, 3, dtype=torch.float64),
        "f16": torch.randn(4, dtype=torch.float16),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "i32": torch.tensor([-7, 0, 2**31 - 1], dtype=torch.int32),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "transposed": base.t(),
        "row_slice": base[1:3],
        "col_slice": base[:, 2:5],
        "param": torch.nn.Parameter(torch.randn(2, 3)),
    }
    path = tmp_path / "state.th"
    torch.save(state, path)
    return path, {key: _to_numpy(value) for key, value in state.items()}


def test_reference_checkpoint_matches_torch() -> None:
    path = REFERENCE / "vdvae_tiny" / "model.th"
    if not path.is_file():
        pytest.skip(f"reference checkpoint {path} is missing")
    torch = pytest.importorskip("torch")
    want = {k: _to_numpy(v) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    got = load_state_dict(path)
    assert len(got) > 0
    _assert_same(got, want)


def test_torch_saved_dtypes_and_views_round_trip(saved) -> None:
    path, want = saved
    got = load_state_dict(path)
    _assert_same(got, want)
    assert got["f32"].dtype == np.float32 and got["bf16"].dtype == np.float32
    assert got["i64"].dtype == np.int64 and got["bool"].dtype == np.bool_


def test_legacy_format_read_through_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = {"transposed": torch.randn(2, 3).t(), "bf16": torch.randn(4, dtype=torch.bfloat16)}
    path = tmp_path / "legacy.th"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    _assert_same(load_state_dict(path), {key: _to_numpy(value) for key, value in state.items()})


def test_reads_zip_with_torch_hidden(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want = saved
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    _assert_same(load_state_dict(path), want)


def test_big_endian_storage(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.float32) * 1.5 - 2
    pkl = b"\x80\x02}" + _str("w") + _tensor("0", 6, 1, (2, 2), (1, 2)) + b"s."
    path = _write_zip(tmp_path / "big.th", pkl, {"0": values.astype(">f4").tobytes()}, byteorder="big")
    got = load_state_dict(path)
    _assert_same(got, {"w": np.array([[values[1], values[3]], [values[2], values[4]]], dtype=np.float32)})


def test_view_outside_storage_is_rejected(tmp_path: Path) -> None:
    pkl = b"\x80\x02}" + _str("w") + _tensor("0", 4, 0, (2, 2), (100, 1)) + b"s."
    path = _write_zip(tmp_path / "oob.th", pkl, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match="storage of 4"):
        load_state_dict(path)


def test_nested_checkpoint_is_rejected(tmp_path: Path) -> None:
    inner = b"}" + _str("w") + _tensor("0", 1, 0, (1,), (1,)) + b"s"
    pkl = b"\x80\x02}" + _str("state_dict") + inner + b"s" + _str("epoch") + _int(3) + b"s."
    path = _write_zip(tmp_path / "nested.th", pkl, {"0": np.ones(1, np.float32).tobytes()})
    with pytest.raises(ValueError, match="flat state dict") as error:
        load_state_dict(path)
    assert "state_dict" in str(error.value) and str(path) in str(error.value)


def test_zip_calling_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = _write_zip(tmp_path / "model.th", pickle.dumps({"w": _RunsShell(marker)}, protocol=2), {})
    with pytest.raises(UnsafeCheckpointError) as error:
        load_state_dict(path)
    assert "system" in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


def test_zip_calling_eval_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = _write_zip(tmp_path / "model.th", pickle.dumps({"w": _RunsEval(marker)}), {})
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_raw_pickle_calling_os_system_is_refused_by_torch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "legacy.th"
    path.write_bytes(pickle.dumps({"w": _RunsShell(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as error:
        load_state_dict(path)
    assert "system" in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()


def test_raw_pickle_without_torch_asks_for_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "legacy.th"
    path.write_bytes(pickle.dumps({"w": _RunsShell(marker)}, protocol=2))
    with pytest.raises(ImportError, match="pip install torch") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.th"
    with pytest.raises(FileNotFoundError, match="absent.th"):
        load_state_dict(path)


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="neither a zip nor a pickle") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)
