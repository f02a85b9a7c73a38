"""Hostile and damaged checkpoint files: each is refused by name, in one line, quickly and with little memory, before
any storage is inflated; nothing is written and the file is left as it was."""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import reference_dir
from test_torch_reader import _global, _str, _tuple

from configs.demo_vdvae import get_config
from vdvae_sr_jax.convert import ConversionError, convert_file, convert_to_orbax
from vdvae_sr_jax.model import init_params, model_from_hparams
from vdvae_sr_jax.torch_reader import CheckpointFormatError, UnsafeCheckpointError, load_state_dict, open_checkpoint

BOMB_BYTES = 565_000_000 * 4  # 2.26 GB of float32 zeros, deflated to about 2.2 MB
MAX_SECONDS = 2.0
MAX_PEAK_BYTES = 16 * 2**20


def _long(value: int) -> bytes:
    """LONG1 opcode: an integer of any size."""
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _view(storage: str, numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """Opcodes for ``_rebuild_tensor_v2`` over float32 storage `storage` of `numel` elements."""
    pid = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str(storage), _str("cpu"), _long(numel)) + b"Q"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(pid, _long(offset), _tuple(*map(_long, size)), _tuple(*map(_long, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict_pickle(views: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of `{key: view}`, as torch.save writes a state dict."""
    return b"\x80\x02}(" + b"".join(_str(key) + view for key, view in views.items()) + b"u."


def _write_zip(path: Path, members: dict[str, tuple[int, bytes, int, int]]) -> Path:
    """A zip written by hand from `{name: (method, bytes as stored, size inflated, crc)}`, so that a member can be
    deflated data that zipfile would take long to compress."""
    body, central = bytearray(), bytearray()
    for name, (method, data, size, crc) in members.items():
        n = name.encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(n), 0, 0, 0, 0, 0, len(body)) + n
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0)
        body += n + data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def _stored(data: bytes) -> tuple[int, bytes, int, int]:
    return zipfile.ZIP_STORED, data, len(data), zlib.crc32(data)


@pytest.fixture(scope="module")
def deflated_zeros() -> tuple[int, bytes, int, int]:
    """BOMB_BYTES zeros as a deflated member: one fully flushed 1 MiB block repeated, then a final block."""
    chunk = bytes(2**20)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc = 0
    for _ in range(BOMB_BYTES // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    rest = bytes(BOMB_BYTES % len(chunk))
    data = (block.compress(chunk) + block.flush(zlib.Z_FULL_FLUSH)) * (BOMB_BYTES // len(chunk))
    return zipfile.ZIP_DEFLATED, data + tail.compress(rest) + tail.flush(), BOMB_BYTES, zlib.crc32(rest, crc)


@pytest.fixture(scope="module")
def tiny():
    """The vdvae_tiny state dict and the template of the demo config (its architecture)."""
    model = model_from_hparams(get_config().model)
    return load_state_dict(reference_dir("vdvae_tiny") / "model.th"), jax.eval_shape(lambda: init_params(model))


def _tiny_with(path: Path, state_dict: dict[str, np.ndarray], views: dict[str, bytes] | None = None,
               records: dict[str, tuple] | None = None) -> Path:
    """vdvae_tiny as a torch.save-like zip (a storage per tensor), with `views` replacing or adding tensors and
    `records` adding storage records."""
    tensors = {key: _view(str(i), a.size, 0, a.shape, tuple(s // 4 for s in a.strides))
               for i, (key, a) in enumerate(state_dict.items())}
    members = {"archive/data.pkl": _stored(_state_dict_pickle({**tensors, **(views or {})})),
               "archive/byteorder": _stored(b"little")}
    members |= {f"archive/data/{i}": _stored(a.astype("<f4").tobytes()) for i, a in enumerate(state_dict.values())}
    return _write_zip(path, members | {f"archive/data/{k}": v for k, v in (records or {}).items()})


def _refused_quickly(error_type, call):
    """Run `call`, which must raise `error_type`; returns the message, after checking time and peak memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(error_type) as error:
            call()
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < MAX_SECONDS and peak < MAX_PEAK_BYTES, (seconds, peak)
    return str(error.value)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deflate_bomb_with_a_parameter_name_is_refused_by_its_shape(tmp_path, tiny, deflated_zeros):
    state_dict, template = tiny
    numel = BOMB_BYTES // 4
    path = _tiny_with(tmp_path / "bomb.th", state_dict, {"decoder.gain": _view("bomb", numel, 0, (numel,), (1,))},
                      {"bomb": deflated_zeros})
    assert path.stat().st_size < 4 * 2**20
    message = _refused_quickly(ConversionError, lambda: convert_file(path, template))
    assert "key 'decoder.gain' has shape (565000000,)" in message and "needs (1, 1, 1, 32)" in message
    assert message.splitlines()[-1].startswith("0 missing, 0 unexpected, 1 mis-shaped:")


def test_deflate_bomb_under_an_extra_key_is_never_inflated(tmp_path, tiny, deflated_zeros):
    state_dict, template = tiny
    numel = BOMB_BYTES // 4
    path = _tiny_with(tmp_path / "bomb.th", state_dict, {"extra": _view("bomb", numel, 0, (numel,), (1,))},
                      {"bomb": deflated_zeros})
    message = _refused_quickly(ConversionError, lambda: convert_file(path, template))
    assert "unexpected key 'extra'" in message
    assert message.splitlines()[-1].startswith("0 missing, 1 unexpected, 0 mis-shaped:")


def test_deflate_bomb_behind_a_right_shaped_tensor_is_read_only_as_far_as_used(tmp_path, tiny, deflated_zeros):
    """A 32-element gain viewing the start of a 2.26 GB storage: 128 bytes are inflated, not the storage."""
    state_dict, template = tiny
    path = _tiny_with(tmp_path / "bomb.th", state_dict,
                      {"decoder.gain": _view("bomb", BOMB_BYTES // 4, 0, (1, 32, 1, 1), (32, 1, 1, 1))},
                      {"bomb": deflated_zeros})
    tracemalloc.start()
    start = time.perf_counter()
    try:
        params = convert_file(path, template)
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 2 * MAX_SECONDS and peak < 4 * sum(a.nbytes for a in state_dict.values()), (seconds, peak)
    np.testing.assert_array_equal(params["decoder"]["gain"], np.zeros((1, 1, 1, 32), np.float32))
    np.testing.assert_array_equal(params["decoder"]["bias"][0, 0, 0], state_dict["decoder.bias"][0, :, 0, 0])


def test_deflate_bomb_writes_no_output(tmp_path, tiny, deflated_zeros):
    path = _tiny_with(tmp_path / "bomb.th", tiny[0], {"extra": _view("bomb", BOMB_BYTES // 4, 0, (9,), (1,))},
                      {"bomb": deflated_zeros})
    before = _digest(path)
    with pytest.raises(ConversionError, match="unexpected key 'extra'"):
        convert_to_orbax(get_config(), path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _digest(path) == before


@pytest.mark.parametrize("name, view, record, expected", [
    ("zero stride", _view("0", 1, 0, (307_000_000,), (0,)), struct.pack("<f", 1.0),
     "tensor 'w': its view has a zero stride (size (307000000,), stride (0,))"),
    ("4 TiB", _view("0", 2**40, 0, (2**40,), (1,)), bytes(4),
     "tensor 'w': storage 0 declares 1,099,511,627,776 elements (4,398,046,511,104 bytes) but its record holds 4"),
    ("huge stride", _view("0", 4, 0, (2, 2), (2**62, 1)), bytes(16),
     "tensor 'w': its view (size (2, 2), stride (4611686018427387904, 1), offset 0) reaches element "
     "4,611,686,018,427,387,905 of a storage of 4"),
    ("negative stride", _view("0", 4, 0, (2, 2), (-2, 1)), bytes(16),
     "tensor 'w': its view has an offset 0, size (2, 2) or stride (-2, 1) that is not a count"),
    ("overlapping", _view("0", 5, 0, (3, 3), (1, 1)), bytes(20),
     "tensor 'w': its view (size (3, 3), stride (1, 1)) has 9 elements, more than its storage's 5"),
    ("sizes without strides", _view("0", 4, 0, (2, 2), (1,)), bytes(16),
     "tensor 'w': its view has 2 sizes (2, 2) but 1 strides (1,)"),
    ("absent record", _view("7", 4, 0, (4,), (1,)), bytes(16),
     "tensor 'w': its storage record archive/data/7 is missing"),
])
def test_impossible_tensor_is_refused_on_opening(tmp_path, name, view, record, expected):
    path = _write_zip(tmp_path / "w.th", {"archive/data.pkl": _stored(_state_dict_pickle({"w": view})),
                                          "archive/data/0": _stored(record)})
    assert path.stat().st_size < 1024
    before = _digest(path)
    message = _refused_quickly(CheckpointFormatError, lambda: open_checkpoint(path))
    assert message == f"{path}: {expected}" or message.startswith(f"{path}: {expected}"), message
    assert _digest(path) == before


def test_stored_record_longer_than_the_file_is_refused(tmp_path):
    path = _write_zip(tmp_path / "w.th", {"archive/data.pkl": _stored(_state_dict_pickle(
        {"w": _view("0", 2**28, 0, (2**28,), (1,))})), "archive/data/0": (zipfile.ZIP_STORED, bytes(16), 2**30, 0)})
    # the central directory claims 2**30 bytes stored; patch its compressed size to match, as a forger would
    raw = bytearray(path.read_bytes())
    raw[raw.rindex(b"PK\x01\x02") + 20:raw.rindex(b"PK\x01\x02") + 24] = struct.pack("<I", 2**30)
    path.write_bytes(bytes(raw))
    message = _refused_quickly(CheckpointFormatError, lambda: open_checkpoint(path))
    assert f"tensor 'w': record archive/data/0 claims 1,073,741,824 bytes of a {len(raw)}-byte file" in message


def test_tensors_spread_thinly_over_a_storage_are_refused_on_reading(tmp_path):
    path = _write_zip(tmp_path / "w.th", {
        "archive/data.pkl": _stored(_state_dict_pickle({"w": _view("0", 4000, 0, (4,), (1000,))})),
        "archive/data/0": _stored(bytes(16000))})
    with open_checkpoint(path) as checkpoint:
        with pytest.raises(CheckpointFormatError) as error:
            checkpoint.read(checkpoint.tensors)
    assert str(error.value) == (f"{path}: the tensors 'w' hold 4 elements spread over 3,001 of storage 0; refusing "
                                "to inflate what no tensor uses")


def test_damaged_storage_record_names_tensor_and_record(tmp_path):
    values = np.arange(4, dtype="<f4")
    members = {"archive/data.pkl": _stored(_state_dict_pickle({"w": _view("0", 4, 0, (4,), (1,))})),
               "archive/data/0": _stored(values.tobytes())}
    members["archive/data/0"] = (*members["archive/data/0"][:3], members["archive/data/0"][3] ^ 1)
    path = _write_zip(tmp_path / "w.th", members)
    with pytest.raises(CheckpointFormatError) as error:
        load_state_dict(path)
    assert str(error.value).startswith(f"{path}: tensor 'w': record archive/data/0 is damaged: Bad CRC-32")


def test_damaged_pickle_is_corrupt_not_unsafe(tmp_path):
    pkl = _state_dict_pickle({"w": _view("0", 4, 0, (4,), (1,))})
    path = _write_zip(tmp_path / "w.th", {"archive/data.pkl": _stored(pkl[: len(pkl) // 2]),
                                          "archive/data/0": _stored(bytes(16))})
    with pytest.raises(CheckpointFormatError) as error:
        load_state_dict(path)
    assert not isinstance(error.value, UnsafeCheckpointError)
    assert str(error.value).startswith(f"{path}: archive/data.pkl is not a complete pickle (damaged or truncated?)")


def test_garbled_global_name_is_corrupt_not_unsafe(tmp_path):
    pkl = b"\x80\x02}" + _str("w") + _global("torch._u\x01ils", "_rebuild_tensor_v2") + b")Rs."
    path = _write_zip(tmp_path / "w.th", {"archive/data.pkl": _stored(pkl)})
    with pytest.raises(CheckpointFormatError, match="which is no Python name: damaged") as error:
        load_state_dict(path)
    assert not isinstance(error.value, UnsafeCheckpointError) and str(path) in str(error.value)


def test_truncated_zip_names_the_file(tmp_path):
    source = (reference_dir("vdvae_tiny") / "model.th").read_bytes()
    path = tmp_path / "cut.th"
    path.write_bytes(source[: len(source) // 2])
    with pytest.raises(CheckpointFormatError) as error:
        load_state_dict(path)
    assert str(error.value) == f"{path}: damaged zip archive: its central directory is missing (truncated?)"


def test_zip_without_a_state_dict_pickle(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="0 <name>/data.pkl records, not one") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)


def _legacy_file(path: Path, numel: int, size: tuple[int, ...], stride: tuple[int, ...], data: bytes) -> Path:
    """A pre-1.6 torch.save file of one float32 tensor {'w': view}, written by hand so its declarations can lie."""
    torch = pytest.importorskip("torch")

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (("S", numel), 0, size, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj == ("S", numel) else None

    buffer = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, buffer, protocol=2)
    Pickler(buffer, protocol=2).dump({"w": Tensor()})
    pickle.dump(["0"], buffer, protocol=2)
    path.write_bytes(buffer.getvalue() + struct.pack("<q", numel) + data)
    return path


def test_legacy_file_read_through_torch_with_views_checked(tmp_path):
    path = _legacy_file(tmp_path / "ok.th", 4, (2, 2), (1, 2), np.arange(4, dtype="<f4").tobytes())
    np.testing.assert_array_equal(load_state_dict(path)["w"], [[0, 2], [1, 3]])
    bomb = _legacy_file(tmp_path / "zero.th", 1, (307_000_000,), (0,), bytes(4))
    message = _refused_quickly(CheckpointFormatError, lambda: load_state_dict(bomb))
    assert message == f"{bomb}: tensor 'w': its view has a zero stride (size (307000000,), stride (0,)), a broadcast " \
                      "that no parameter is"


def test_legacy_4tib_declaration_is_a_format_error(tmp_path):
    path = _legacy_file(tmp_path / "huge.th", 2**40, (2**40,), (1,), bytes(16))
    message = _refused_quickly(CheckpointFormatError, lambda: load_state_dict(path))
    assert message.startswith(f"{path}: torch cannot read it as a legacy checkpoint: RuntimeError:")
    assert "4398046511104 bytes" in message and "\n" not in message


@pytest.mark.parametrize("cut", [200, 31])
def test_damaged_legacy_file_is_corrupt_not_unsafe(tmp_path, cut):
    source = _legacy_file(tmp_path / "ok.th", 4, (4,), (1,), bytes(16)).read_bytes()
    path = tmp_path / "cut.th"
    path.write_bytes(source[:cut] if cut > 100 else source[:cut] + b"\xff" + source[cut + 1:])
    with pytest.raises(CheckpointFormatError) as error:
        load_state_dict(path)
    assert not isinstance(error.value, UnsafeCheckpointError) and str(error.value).startswith(f"{path}: ")
