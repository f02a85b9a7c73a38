"""Multi-process training for real: processes on this machine, each with fake CPU devices, joined on a localhost
coordinator through the command line's flags, against one process with all the devices.

One scenario, shared by the tests below, trains the tiny model of tests/tiny_training.py in one workdir:
2 processes x 2 devices to step 3, 1 process x 4 devices to step 4, 2 processes stopped by SIGTERM at a step N,
2 processes again to N + 1; then one process x 4 devices trains straight to N + 1 in another workdir. Process 1's
workdir is a folder of its own whose only entry, `checkpoints`, links to process 0's checkpoints (the shared
filesystem of a cluster), so that anything else process 1 wrote would be found there.
"""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = 10  # seconds: a dead process stops the others after about this long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(workdir: Path, steps: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "vdvae_sr_jax.main", f"--config=tests/tiny_training.py:{steps},2,1",
            f"--workdir={workdir}", "--config.train.keep_checkpoints=100", f"--heartbeat_timeout={HEARTBEAT}", *extra]


def _start(env, workdirs: list[Path], steps: int, extra=()) -> list[subprocess.Popen]:
    """One process with 4 devices in workdirs[0], or one per workdir with 4 / len(workdirs) devices each; their
    output goes to <workdir>.log."""
    n = len(workdirs)
    env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // n}")
    port = _free_port()
    processes = []
    for i, workdir in enumerate(workdirs):
        launch = [f"--coordinator_address=localhost:{port}", f"--num_processes={n}", f"--process_id={i}"] if n > 1 \
            else []
        log = workdir.with_suffix(".log").open("w")
        processes.append(subprocess.Popen(_command(workdir, steps, [*launch, *extra]), cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, text=True))
        log.close()
    return processes


def _finish(processes, workdirs) -> None:
    for process, workdir in zip(processes, workdirs):
        process.wait(timeout=900)
        assert process.returncode == 0, workdir.with_suffix(".log").read_text()[-3000:]


def _run(env, workdirs, steps, extra=()) -> None:
    _finish(_start(env, workdirs, steps, extra), workdirs)


def _logged_steps(workdir: Path) -> list[int]:
    metrics = workdir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]


def _wait_for_step(workdir: Path, step: int, processes) -> None:
    deadline = time.time() + 900
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if any(s >= step for s in _logged_steps(workdir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"training never reached step {step}: " + workdir.with_suffix(".log").read_text()[-3000:])


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """The flat raw and EMA params of the checkpoint of `step`, read onto this process's one device."""
    path = workdir / "checkpoints" / str(step) / "default"
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          dict(checkpointer.metadata(path).item_metadata))
    state = checkpointer.restore(path, target)
    return {key: np.asarray(state[key]) for key in ("flat_params", "flat_ema")}


def _assert_same_params(a: dict, b: dict, what: str) -> None:
    assert a["flat_params"].size > 10_000, what
    for key in a:  # float32 sums in another order: the tolerance of test_trainer's 4 devices against 1
        np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=2e-6, err_msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, subprocess_env) -> dict:
    root = tmp_path_factory.mktemp("multiprocess")
    zero, one, straight = root / "process0", root / "process1", root / "straight"
    (zero / "checkpoints").mkdir(parents=True)
    one.mkdir()
    (one / "checkpoints").symlink_to(zero / "checkpoints")
    pair = [zero, one]
    _run(subprocess_env, pair, 3, ["--config.train.sample_every=3"])
    after_first = {"files": sorted(p.name for p in zero.iterdir()), "logged": _logged_steps(zero),
                   "process0_log": zero.with_suffix(".log").read_text()}
    _run(subprocess_env, [zero], 4)
    processes = _start(subprocess_env, pair, 500)
    _wait_for_step(zero, 6, processes)
    processes[0].send_signal(signal.SIGTERM)  # as a cluster's scheduler does, to every process, not all at once
    time.sleep(0.5)
    processes[1].send_signal(signal.SIGTERM)
    _finish(processes, pair)
    logs = [w.with_suffix(".log").read_text() for w in pair]
    stopped = json.loads((zero / "train_result.json").read_text())
    _run(subprocess_env, pair, stopped["step"] + 1)
    _run(subprocess_env, [straight], stopped["step"] + 1)
    return {"zero": zero, "one": one, "straight": straight, "after_first": after_first, "sigterm_logs": logs,
            "stopped": stopped, "final": json.loads((zero / "train_result.json").read_text())}


def test_two_processes_of_two_devices_train_as_one_of_four(scenario):
    assert "process 0 of 2, with 2 of the 4 devices" in scenario["after_first"]["process0_log"]
    assert scenario["after_first"]["logged"] == [1, 2, 3]
    _assert_same_params(_params(scenario["zero"], 3), _params(scenario["straight"], 3), "2 x 2 against 1 x 4")


def test_only_process_0_writes_logs_grids_and_results(scenario):
    zero, one = scenario["zero"], scenario["one"]
    assert scenario["after_first"]["files"] == ["checkpoints", "metrics.jsonl", "samples_0000003.png", "tensorboard",
                                                "train_result.json"]
    assert [p.name for p in one.iterdir()] == ["checkpoints"]  # through all three runs of two processes
    n = scenario["stopped"]["step"]
    assert _logged_steps(zero) == list(range(1, n + 2))  # each step's record once, from whichever process 0
    assert len(list((zero / "tensorboard").iterdir())) == 4  # one event file per run
    assert "{\n \"step\"" not in one.with_suffix(".log").read_text()  # the result is printed by process 0 only


def test_sigterm_stops_every_process_at_the_same_step_with_a_checkpoint(scenario):
    stopped, logs = scenario["stopped"], scenario["sigterm_logs"]
    n = stopped["step"]
    assert stopped["stopped"] and 6 <= n < 500
    for log in logs:
        assert re.findall(r"stopped by signal (\d+) at step (\d+); a checkpoint was saved", log) == [("15", str(n))]
    assert (scenario["zero"] / "checkpoints" / str(n) / "commit_success.txt").exists()


def test_resumes_with_one_process_and_with_two_give_the_params_of_a_straight_run(scenario):
    zero, straight, n = scenario["zero"], scenario["straight"], scenario["stopped"]["step"]
    assert scenario["final"]["step"] == n + 1 and not scenario["final"]["stopped"]
    for step, what in [(4, "2 processes resumed by 1"), (n, "1 process resumed by 2, stopped by SIGTERM"),
                       (n + 1, "resumed after SIGTERM by 2 processes")]:
        _assert_same_params(_params(zero, step), _params(straight, step), what)


def test_a_killed_process_makes_the_other_fail_within_the_heartbeat_timeout(tmp_path, subprocess_env):
    pair = [tmp_path / "process0", tmp_path / "process1"]
    (pair[0] / "checkpoints").mkdir(parents=True)
    pair[1].mkdir()
    (pair[1] / "checkpoints").symlink_to(pair[0] / "checkpoints")
    processes = _start(subprocess_env, pair, 500)
    _wait_for_step(pair[0], 2, processes)
    processes[1].send_signal(signal.SIGKILL)
    gone = time.time()
    try:
        processes[0].wait(timeout=HEARTBEAT + 60)
    finally:
        processes[0].kill()
    output = pair[0].with_suffix(".log").read_text()
    assert processes[0].returncode != 0 and time.time() - gone < HEARTBEAT + 60, output[-3000:]
    # Either the collective process 0 waits in sees the connection go (a one-line error), or JAX's heartbeat
    # check terminates it, whichever comes first.
    last = [line for line in output.strip().splitlines() if "resource_tracker" not in line][-1]
    # (The collective may be a checkpoint save's, whose failure names the checkpoints to resume from.)
    assert re.fullmatch(r"(JaxRuntimeError: |saving a checkpoint in \S+ failed \(JaxRuntimeError: )"
                        r".*Gloo \S+ failed: .*Connection reset by peer.*", last) or \
        "Terminating process because the JAX distributed service detected fatal errors. This most likely indicates " \
        "that another task died" in output, output[-3000:]


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2", "--process_id=0"],
     "a manual multi-process launch needs all of --coordinator_address, --num_processes and --process_id; "
     "--coordinator_address missing"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
     "--coordinator_address=localhost is not HOST:PORT (e.g. localhost:8476, or process 0's host name and a free "
     "port)"),
    (["--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=2"],
     "--process_id=2: with --num_processes=2 it is one of 0..1"),
    (["--coordinator_address=localhost:{taken}", "--num_processes=2", "--process_id=0"],
     "--coordinator_address=localhost:{taken}: process 0 cannot listen on that port; it is in use (another run, or a "
     "second process 0?): choose a free port"),
])
def test_bad_launch_flags_give_one_line(tmp_path, subprocess_env, flags, message):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        values = {"port": _free_port(), "taken": taken.getsockname()[1]}
        flags = [f.format(**values) for f in flags]
        done = subprocess.run(_command(tmp_path, 3, flags), cwd=ROOT, env=subprocess_env, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == message.format(**values)
