"""The training system end to end, in subprocesses: 4 fake devices against 1, and resuming after a kill."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent / "tiny_training.py"


def _start(env, workdir, steps, per_device, devices=1, checkpoint_every=1000, options=()):
    env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [sys.executable, str(SCRIPT), str(workdir), str(steps), str(per_device), str(checkpoint_every), *options]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def _final(workdir) -> dict[str, np.ndarray]:
    with np.load(workdir / "final.npz") as f:
        return {k: f[k] for k in f.files}


def test_metrics_jsonl_writes_non_finite_values_as_null(tmp_path):
    from vdvae_sr_jax.trainer import _Reporter

    reporter = _Reporter(tmp_path)
    reporter.write(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4, "skipped_total": 1})
    reporter.close()

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=strict) == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-4,
                                                       "skipped_total": 1}


def _wait_for_step(workdir: Path, step: int, process) -> None:
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"training never reached step {step}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, subprocess_env) -> dict[str, np.ndarray]:
    """Six steps on one device, checkpointed after each: what four devices and a resumed run must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    _finish(_start(subprocess_env, workdir, 6, 8, checkpoint_every=1))
    return _final(workdir)


def test_four_devices_give_the_same_params_as_one(tmp_path, subprocess_env, straight):
    _finish(_start(subprocess_env, tmp_path, 6, 2, devices=4))
    a, b = straight, _final(tmp_path)
    assert int(a["devices"]) == 1 and int(b["devices"]) == 4 and int(a["step"]) == int(b["step"]) == 6
    params = [k for k in a if k.startswith(("params/", "ema/"))]
    assert len(params) > 20
    for key in params:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=2e-6, err_msg=key)
    # The 4x4 LR image conditions the 1x1 and 4x4 blocks (runs 0_0, 1_1): their gates have left zero. The 8x8
    # and 16x16 blocks (runs 2_3, 4_5) see no LR activation, so their gates get no gradient and stay at zero.
    gates = {k.split("dec_blocks_")[1].split("'")[0]: np.abs(a[k]).max() for k in params
             if k.startswith("params/") and "gate" in k}
    assert gates["0_0"] > 0 and gates["1_1"] > 0 and gates["2_3"] == 0 and gates["4_5"] == 0


def test_killed_run_resumes_to_identical_params(tmp_path, subprocess_env, straight):
    killed = _start(subprocess_env, tmp_path, 6, 8, checkpoint_every=1)
    _wait_for_step(tmp_path, 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "final.npz").exists()
    _finish(_start(subprocess_env, tmp_path, 6, 8, checkpoint_every=1))
    resumed = _final(tmp_path)
    assert int(resumed["step"]) == 6
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    assert (tmp_path / "checkpoints" / "6" / "data" / "process_0-of-1.json").is_file()  # the data iterator's state
    shares = [r["data_wait_share"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(shares) >= 6 and all(0 <= share < 1 for share in shares)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
    tmp_path, subprocess_env, straight
):
    """Finding 1 of issue 25: a data file of the newest checkpoint overwritten used to be resumed silently."""
    _finish(_start(subprocess_env, tmp_path, 3, 8, checkpoint_every=1))
    newest = tmp_path / "checkpoints" / "3"
    data_file = max((p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"),
                    key=lambda p: p.stat().st_size)
    with data_file.open("r+b") as f:
        f.seek(data_file.stat().st_size // 2)
        f.write(b"\xff" * 64)
    process = _start(subprocess_env, tmp_path, 6, 8, checkpoint_every=1)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    assert re.search(r"the checkpoint at \S*checkpoints/3 is (corrupt|unreadable).*moved to \S*rejected_checkpoints/3",
                     output), output[-3000:]
    assert "using the checkpoint of step 2 instead" in output
    assert (tmp_path / "rejected_checkpoints" / "3" / "default").is_dir()
    resumed = _final(tmp_path)
    assert int(resumed["step"]) == 6
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)


FULL_DISK = """
set -e
mount -t tmpfs -o size=2000k tmpfs "$1"
status=0
"$2" "$3" "$1/run" 6 8 1 > "$4/full.log" 2>&1 || status=$?
echo "$status" > "$4/full.status"
mount -o remount,size=8m "$1"
"$2" "$3" "$1/run" 6 8 1 > "$4/resumed.log" 2>&1
cp "$1/run/final.npz" "$4/"
"""


def test_a_full_disk_stops_training_in_one_line_and_a_rerun_with_space_resumes(tmp_path, subprocess_env, straight):
    """A 2 MB tmpfs in a private mount namespace; then more space, and the same command again."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    (tmp_path / "disk").mkdir()
    script = [str(tmp_path / "disk"), sys.executable, str(SCRIPT), str(tmp_path)]
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK, "full_disk", *script], env=subprocess_env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr + (tmp_path / "resumed.log").read_text()[-3000:]
    full = (tmp_path / "full.log").read_text()
    assert int((tmp_path / "full.status").read_text()) == 1
    found = re.search(r"CheckpointError: the disk holding \S*run/checkpoints has [\d.]+ MiB free and a checkpoint "
                      r"needs up to [\d.]+ MiB; the complete checkpoints are steps (\d), (\d), (\d): free some space "
                      r"and rerun to resume from step (\d)\n", full)
    assert found, full[-3000:]
    steps = [int(s) for s in found.groups()]
    assert steps[1:3] == [steps[0] + 1, steps[0] + 2] and steps[3] == steps[2] < 6
    assert "Exception ignored" not in full and "RESOURCE_EXHAUSTED" not in full and full.count("Traceback") == 1
    resumed = _final(tmp_path)
    assert int(resumed["step"]) == 6
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)


def test_sigterm_saves_and_stops(tmp_path, subprocess_env):
    process = _start(subprocess_env, tmp_path, 500, 8)
    _wait_for_step(tmp_path, 2, process)
    process.send_signal(signal.SIGTERM)
    _finish(process)
    final = _final(tmp_path)
    assert bool(final["stopped"]) and 2 <= int(final["step"]) < 500
