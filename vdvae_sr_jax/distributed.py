"""Multi-process runs on JAX's distributed runtime: joining it (from a cluster's environment or explicit flags), which
process writes the run's files, and a SIGTERM stop that every process takes at the same step."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Callable

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
        if process_id == 0:
            _check_port_free(coordinator_address)
    # CPU processes exchange their collectives over TCP with gloo (JAX's default in recent releases, not all).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except ValueError as error:
        if not missing:
            raise ValueError(f"joining the processes at {coordinator_address} failed: {error}") from None
        raise ValueError(f"--distributed: JAX found no SLURM, Open MPI or Cloud TPU environment ({error}): launch "
                         "each process with --coordinator_address, --num_processes and --process_id") from None
    except jax.errors.JaxRuntimeError as error:
        if "Failed to start RPC server" in str(error):
            raise _port_in_use(coordinator_address) from None
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


def _check_port_free(address: str) -> None:
    """Process 0's coordinator listens on the port on every interface; JAX can crash, rather than raise, when the port
    is taken, so it is tried here first."""
    port = int(address.rpartition(":")[2])
    dual = socket.has_dualstack_ipv6()
    family = socket.AF_INET6 if dual else socket.AF_INET
    try:
        socket.create_server(("", port), family=family, dualstack_ipv6=dual).close()
    except OSError:
        raise _port_in_use(address) from None


def _port_in_use(address: str) -> ConnectionError:
    return ConnectionError(f"--coordinator_address={address}: process 0 cannot listen on that port; it is in use "
                           "(another run, or a second process 0?): choose a free port")


def leave_at_once(main: Callable) -> Callable:
    """`main` (for `app.run`, outside `cli.one_line_errors`) such that, in a multi-process run, a process that fails
    writes its error and exits at once. Exiting normally, it would wait in JAX's shutdown barrier for the others,
    which wait in their next collective for it: both would hang. Gone, it stops sending heartbeats, and JAX
    terminates the others after the heartbeat timeout."""

    @functools.wraps(main)
    def wrapped(*args):
        try:
            return main(*args)
        except BaseException as error:
            if not jax.distributed.is_initialized() or (isinstance(error, SystemExit) and not error.code):
                raise
            if isinstance(error, SystemExit):
                print(error.code, file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(1)

    return wrapped


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
