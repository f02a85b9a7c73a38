"""The grain input pipeline: batches that depend on (seed, step) only, whatever the worker and process counts; an
exact resume from the checkpointed iterator; unreadable images skipped and named; nothing decoded up front."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from vdvae_sr_jax import data, image_io, pipeline, train
from vdvae_sr_jax.checkpoint import TrainCheckpoints

NORM = pipeline.Normalisation(pixel_max=255.0, shift=-115.9, scale=0.0144, shift_loss=-127.5, scale_loss=1 / 127.5,
                              downscale="matlab")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six small photos of different sizes, as PNG and JPEG files."""
    root = tmp_path_factory.mktemp("images")
    for i, (name, image) in enumerate(data.embedded_photos()[:6]):
        small = image[:: 4 + i % 2, :: 4 + i % 3]
        Image.fromarray(small).save(root / f"{i}_{name.split('.')[0]}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


def _rows(source, global_batch=8, processes=1, preprocess="crops", seed=3):
    return pipeline.Rows(source, 32, preprocess, global_batch, processes, seed, NORM, False, 4, True)


def _take(iterator, n):
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("preprocess, worker_counts", [("crops", (0, 1, 4)), ("thesis", (0, 2))])
def test_batches_are_the_same_for_0_1_and_4_workers(folder, preprocess, worker_counts):
    rows = _rows(data.folder_source(folder), preprocess=preprocess)
    runs = {workers: _take(pipeline.local_batches(rows, 5, 0, workers), 4) for workers in worker_counts}
    first = runs[0]
    assert first[0]["input"].shape == (8, 32, 32, 3) and first[0]["input"].dtype == np.float32
    assert first[0]["lr_input"].shape == (8, 8, 8, 3) and first[0]["lr_target"].shape == (8, 8, 8, 3)
    assert not np.array_equal(first[0]["input"], first[1]["input"])  # batches differ from step to step
    distinct_rows = len({first[0]["input"][r].tobytes() for r in range(8)})
    assert distinct_rows == 8 if preprocess == "crops" else 3 <= distinct_rows <= 6  # thesis: one crop per image
    # the row is the normalised crop, and its LR input the MATLAB-bicubic shrink of that crop
    hr = np.round(first[2]["input"] / NORM.scale - NORM.shift).astype(np.uint8)
    expected_lr = data.normalize(data.downscale(hr, 4, "matlab"), NORM)[0]
    np.testing.assert_allclose(first[2]["lr_input"], expected_lr, atol=1e-5)
    for workers in worker_counts[1:]:
        _assert_same(first, runs[workers])


class _Counting:
    """A source that records which images are read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.read.append(index)
        return self.source[index]


def test_the_rows_of_two_processes_concatenate_to_the_one_process_batch_and_each_reads_only_its_own(folder):
    one = _take(pipeline.local_batches(_rows(data.folder_source(folder)), 4, 0, 0), 3)
    halves, reads = [], []
    for process in (0, 1):
        source = _Counting(data.folder_source(folder))
        halves.append(_take(pipeline.local_batches(_rows(source, processes=2), 4, process, 0), 3))
        reads.append(set(source.read))
    for k in range(3):
        assert halves[0][k]["input"].shape == (4, 32, 32, 3)
        for key in one[k]:
            np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), one[k][key])
    # each process read exactly the images its rows drew: those of rows 0-3, or 4-7, of batches 0-3 (one read ahead)
    for process in (0, 1):
        needed = set()
        for k in range(4):
            for r in range(4 * process, 4 * process + 4):
                source = _Counting(data.folder_source(folder))
                _rows(source).row(k, r)
                needed |= set(source.read)
        assert reads[process] <= needed and len(reads[process]) >= 3
    assert reads[0] != reads[1]


def _state(step):
    params = {"w": jnp.arange(6, dtype=jnp.float32)}
    return train.init_state(params, optax.adam(1e-3), jax.random.key(0)).replace(step=jnp.int32(step))


def test_resume_from_a_mid_run_checkpoint_gives_the_batches_of_a_straight_run(folder, tmp_path, caplog):
    """Three of six steps, saved with the iterator; a new pipeline (2 workers instead of 0) restored from it goes on
    with batches 3, 4, 5. So does one restored from a checkpoint written before iterator states were saved, and
    one whose iterator state was written by another number of processes."""
    rows = _rows(data.folder_source(folder))
    straight = _take(pipeline.local_batches(rows, 6, 0, 0), 6)
    first = pipeline.Batches(pipeline.local_batches(rows, 6, 0, 0), 8, None)
    assert all(np.array_equal(next(first.iterator)["input"], straight[k]["input"]) for k in range(3))
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=3)
    assert ckpts.save(3, _state(3), data_iterator=first.iterator)
    next(first.iterator)  # the save holds the position it was given, not a later one
    ckpts.close()
    first.close()
    assert (tmp_path / "ckpts" / "3" / "data" / "process_0-of-1.json").is_file()

    resumed = pipeline.Batches(pipeline.local_batches(rows, 6, 0, 2), 8, None)
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=3)
    state = ckpts.restore_latest(_state(0), data_iterator=resumed.iterator)
    ckpts.close()
    assert int(state.step) == 3 and resumed.iterator.get_state() == {"global_next_index": 24}
    resumed.resume(int(state.step))
    _assert_same(_take(resumed.iterator, 3), straight[3:])

    (tmp_path / "ckpts" / "3" / "data" / "process_0-of-1.json").rename(
        tmp_path / "ckpts" / "3" / "data" / "process_1-of-2.json")
    other = pipeline.local_batches(rows, 6, 0, 0)
    TrainCheckpoints(tmp_path / "ckpts", keep=3).restore_latest(_state(0), data_iterator=other)
    assert other.get_state() == {"global_next_index": 24}
    other.close()

    (tmp_path / "ckpts" / "3" / "data" / "process_1-of-2.json").write_text("{not json")
    damaged = pipeline.Batches(pipeline.local_batches(rows, 6, 0, 0), 8, None)
    with caplog.at_level(logging.WARNING):
        state = TrainCheckpoints(tmp_path / "ckpts", keep=3).restore_latest(_state(0), data_iterator=damaged.iterator)
    assert int(state.step) == 3 and f"the data iterator state at {tmp_path / 'ckpts' / '3' / 'data'} is unreadable" \
        in caplog.text
    damaged.resume(3)
    _assert_same(_take(damaged.iterator, 3), straight[3:])

    shutil.rmtree(tmp_path / "ckpts" / "3" / "data")  # now as written before this pipeline: the state alone
    old = pipeline.Batches(pipeline.local_batches(rows, 6, 0, 0), 8, None)
    state = TrainCheckpoints(tmp_path / "ckpts", keep=3).restore_latest(_state(0), data_iterator=old.iterator)
    assert int(state.step) == 3 and old.iterator.get_state() == {"global_next_index": 0}
    old.resume(3)
    _assert_same(_take(old.iterator, 3), straight[3:])


def test_checkpoints_written_before_the_pipeline_restore(tmp_path):
    """A checkpoint as TrainCheckpoints wrote it before: one StandardCheckpointHandler item, arrays' checksums."""
    from vdvae_sr_jax.checkpoint import fingerprint

    manager = ocp.CheckpointManager(tmp_path / "ckpts", options=ocp.CheckpointManagerOptions(create=True),
                                    item_handlers=ocp.StandardCheckpointHandler())
    manager.save(5, args=ocp.args.StandardSave(_state(5)), custom_metadata={"arrays": fingerprint(_state(5))[0]})
    manager.wait_until_finished()
    manager.close()
    ckpts = TrainCheckpoints(tmp_path / "ckpts", keep=3)
    restored = ckpts.restore_latest(_state(0), data_iterator=pipeline.local_batches(_rows([]), 1, 0, 0))
    assert int(restored.step) == 5
    np.testing.assert_array_equal(restored.flat_params, _state(5).flat_params)
    assert ckpts.save(6, _state(6))
    ckpts.close()


def test_an_unreadable_image_is_skipped_named_once_and_replaced_the_same_way_by_any_worker_count(
    folder, tmp_path, caplog
):
    for path in folder.iterdir():
        shutil.copy(path, tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "small.png")
    source = data.folder_source(tmp_path)
    assert len(source) == 8  # listed, not yet read
    with caplog.at_level(logging.WARNING):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        batches = pipeline.Batches(pipeline.local_batches(_rows(source), 10, 0, 0), 8, sharding)
        seen = [next(batches) for _ in range(10)]
        batches.close()
    assert caplog.text.count(f"training images: skipped cannot read image {tmp_path / 'broken.png'}") == 1
    assert caplog.text.count(f"training images: skipped {tmp_path / 'small.png'} (smaller than 32 pixels)") == 1
    # the two were drawn many times in 80 rows (1 in 4 draws), each time redrawn from the row's RNG
    broken, small = source.paths.index(str(tmp_path / "broken.png")), source.paths.index(str(tmp_path / "small.png"))
    drawn = [int(np.random.default_rng([3, k, r]).integers(8)) for k in range(10) for r in range(8)]
    assert drawn.count(broken) >= 3 and drawn.count(small) >= 3
    with_workers = _take(pipeline.local_batches(_rows(source), 10, 0, 2), 10)
    for k in range(10):
        np.testing.assert_array_equal(np.asarray(seen[k]["input"]), with_workers[k]["input"])
    assert all(np.isfinite(b["input"]).all() and b["input"].std() > 0.1 for b in with_workers)


def test_a_source_with_no_readable_image_names_them(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"none of the 2 training images can be read: cannot read image .*a\.png"):
        _rows(data.folder_source(tmp_path)).row(0, 0)


def test_listing_a_folder_and_starting_the_pipeline_decode_nothing_and_validation_reads_only_its_images(
    folder, monkeypatch
):
    read = []
    real = image_io.load_image
    monkeypatch.setattr(image_io, "load_image", lambda path: read.append(path) or real(path))
    source = data.folder_source(folder)
    iterator = pipeline.local_batches(_rows(source), 1000, 0, 0)
    assert len(source) == 6 and read == []
    cfg = ml_collections.ConfigDict(dict(source="folder", folder=str(folder), val_folder=str(folder)))
    crops = data.validation_crops(cfg, 32, 2)
    assert crops.shape == (2, 32, 32, 3) and [str(p) for p in read] == list(source.paths[:2])
    next(iterator)
    assert 8 <= len(read) - 2 <= 8 * 4  # one batch, and at most the few being prepared ahead
    iterator.close()


def test_the_embedded_source_serves_the_photos():
    source = data.hr_source(ml_collections.ConfigDict(dict(source="embedded")))
    assert len(source) == 8
    np.testing.assert_array_equal(source[1], data.embedded_photos()[1][1])


KILLED = """
import os, signal, sys
sys.path[:0] = [sys.argv[2], os.path.dirname(sys.argv[2])]
from test_pipeline import _rows
from vdvae_sr_jax import data, pipeline
if __name__ == "__main__":
    iterator = pipeline.local_batches(_rows(data.folder_source(sys.argv[1])), 100, 0, 1)
    next(iterator)
    with open(sys.argv[3], "w") as f:
        f.write(" ".join(str(c.pid) for c in __import__("multiprocessing").active_children()))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_workers_of_a_killed_training_process_exit(folder, tmp_path, subprocess_env):
    script, log, pids = tmp_path / "killed.py", tmp_path / "killed.log", tmp_path / "pids"
    script.write_text(KILLED)
    with log.open("w") as out:  # a file, not a pipe: a worker left behind would hold a pipe open
        done = subprocess.run([sys.executable, str(script), str(folder), os.path.dirname(__file__), str(pids)],
                              env=subprocess_env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    workers = [int(pid) for pid in pids.read_text().split()]
    assert workers
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.2)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    for pid in alive:  # a worker of this test left behind: end it, then fail
        os.kill(pid, signal.SIGKILL)
    assert not alive
