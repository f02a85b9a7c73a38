"""Multi-process runs on JAX's distributed runtime: joining it (from a cluster's environment or explicit flags), which
process writes the run's files, and a SIGTERM stop that every process takes at the same step."""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int = 100) -> None:
    """Joins the job's processes. With no arguments JAX reads them from SLURM, Open MPI or a Cloud TPU pod; a manual
    launch gives all three. A process that stops sending heartbeats for `heartbeat_timeout` seconds (killed, its
    host down) makes JAX terminate the others, which would otherwise wait in their next collective forever."""
    manual = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
    missing = [name for name, value in manual.items() if value is None]
    if 0 < len(missing) < 3:
        raise ValueError(f"a manual multi-process launch needs all of --coordinator_address, --num_processes and "
                         f"--process_id; {', '.join(missing)} missing")
    if not missing:
        _check_manual(coordinator_address, num_processes, process_id)
    # CPU processes exchange their collectives over TCP with gloo (JAX's default in recent releases, not all).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except ValueError as error:  # no cluster environment found and no flags given
        raise ValueError(f"--distributed: JAX found no SLURM, Open MPI or Cloud TPU environment ({error}): launch "
                         "each process with --coordinator_address, --num_processes and --process_id") from None
    except jax.errors.JaxRuntimeError as error:
        if "Failed to start RPC server" in str(error):
            raise ConnectionError(f"--coordinator_address={coordinator_address}: process 0 cannot listen on that port; "
                                  "it is in use (another run, or a second process 0?): choose a free port") from None
        raise ConnectionError(f"joining the processes at {coordinator_address} failed: "
                              f"{str(error).splitlines()[0]}") from None
    logging.info("process %d of %d, with %d of the %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def _check_manual(address: str, num_processes: int, process_id: int) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator_address={address} is not HOST:PORT (e.g. localhost:8476, or process 0's "
                         "host name and a free port)")
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: needs at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id}: with --num_processes={num_processes} it is one of "
                         f"0..{num_processes - 1}")


def is_main_process() -> bool:
    """Whether this process writes the run's shared files (logs, sample grids, results): process 0 only."""
    return jax.process_index() == 0


class SigtermStop:
    """Tells the training loop when to stop after SIGTERM. One process catches the signal itself; several ask JAX's
    preemption service, which hears the signal in any of them and names, through the coordinator, the step after the
    furthest one reached, so that every process stops at the same step and none waits in a collective that the others
    skipped. Call `__call__` at every step, from the same step in every process."""

    def __init__(self):
        self.signal: int | None = None
        self.shared = jax.process_count() > 1
        if not self.shared:
            self.previous = signal.signal(signal.SIGTERM, self._caught)

    def _caught(self, signum, _frame) -> None:
        self.signal = signum

    def __call__(self, step: int) -> bool:
        """Whether to save and stop after `step`."""
        if self.shared and self.signal is None and multihost_utils.reached_preemption_sync_point(step):
            self.signal = signal.SIGTERM
        return self.signal is not None

    def close(self) -> None:
        if not self.shared:
            signal.signal(signal.SIGTERM, self.previous)
