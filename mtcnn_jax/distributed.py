"""Training on several processes (hosts) with JAX's own distributed runtime (`jax.distributed`).

    python -m mtcnn_jax.train ... --coordinator HOST:PORT --num-processes N --process-id I

Run the same command once per process (I = 0 .. N-1; HOST:PORT is process 0's address, reachable by all).
Every process reads its own rows of each global batch (`input_pipeline.process_batch`), the step runs over
the devices of all processes (`train_step.data_mesh`), and the parameters after each step are the same on
every process and the same as one process training on the whole batch. Process 0 alone writes config.json,
metrics.jsonl and the progress; the checkpoints are written once, by Orbax's multi-process save (every
process takes part, process 0 writes), so WORKDIR must be one folder all processes see (a shared
filesystem, as Orbax requires); a run saved by N processes resumes on any number of them.

Without the flags a run is one process, as before. `JAX_COORDINATOR_ADDRESS` stands in for --coordinator.
On CPU the processes' collectives use gloo.
"""

from __future__ import annotations

import argparse
import os
import jax
import numpy as np
from jax.experimental import multihost_utils

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # what jax.distributed itself reads for the coordinator


def add_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator HOST:PORT, --num-processes N, --process-id I."""
    group = parser.add_argument_group("several processes (jax.distributed)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help=f"process 0's address (default: ${COORDINATOR_ENV})")
    group.add_argument("--num-processes", type=int, default=None, metavar="N", help="how many processes train")
    group.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1")


def check_flags(coordinator: str | None, num_processes: int | None,
                process_id: int | None) -> tuple[str, int, int] | None:
    """(coordinator, N, I) for `jax.distributed.initialize`, or None for a one-process run; ValueError
    naming the flag that is missing or out of range."""
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    if num_processes is None and process_id is None:
        if coordinator is not None and coordinator != os.environ.get(COORDINATOR_ENV):
            raise ValueError("--coordinator needs --num-processes N and --process-id I")
        return None
    if num_processes is None or num_processes < 1:
        raise ValueError(f"--num-processes {num_processes}: expected an integer >= 1 (with --process-id)")
    if process_id is None or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id}: expected an integer in 0 .. {num_processes - 1} "
                         f"(--num-processes {num_processes})")
    if num_processes == 1:
        return None
    if coordinator is None:
        raise ValueError(f"--num-processes {num_processes} needs --coordinator HOST:PORT (or ${COORDINATOR_ENV})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {coordinator}: expected HOST:PORT, like 10.0.0.1:1234")
    return coordinator, num_processes, process_id


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300) -> None:
    """Join the run: `jax.distributed.initialize` (before any other JAX call), with gloo for the CPU's
    collectives. Waits up to `timeout_s` for every process to join."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - a timeout, a port in use, JAX already started: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"--coordinator {coordinator}: process {process_id} of {num_processes} could not join "
                         f"the run ({type(err).__name__}: {first})") from None


def process() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """True on the process that writes the run's files and shows its progress (process 0)."""
    return jax.process_index() == 0


def check_devices() -> None:
    """ValueError unless every process has the same number of devices (each reads an equal share)."""
    counts = np.bincount([d.process_index for d in jax.devices()], minlength=jax.process_count())
    if len(set(counts.tolist())) > 1:
        raise ValueError(f"the processes have different numbers of devices ({counts.tolist()}): each must "
                         "have the same number")


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any of them (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))


def failed_processes(failed: bool) -> list[int]:
    """The indices of the processes that passed failed=True (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [0] if failed else []
    flags = np.asarray(multihost_utils.process_allgather(np.array(bool(failed))))
    return np.flatnonzero(flags).tolist()


def agree_to_start(error: BaseException | None) -> None:
    """Before training: raise `error` if this process's checks failed, and a ValueError naming the others
    that failed if any did, so that no process waits alone for the others' first step."""
    failed = failed_processes(error is not None)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process {', '.join(map(str, failed))} stopped before training (see its error)")


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op on one process): Orbax's collective calls
    depend on what the shared WORKDIR holds, so no process changes it while another is still reading it."""
    if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)
