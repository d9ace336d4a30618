"""Preemption: a signal asks the run to checkpoint at the next common iteration and leave with PREEMPTED_EXIT.

Schedulers announce the end of a job with a signal some time before they kill it (Kubernetes and torchrun:
SIGTERM; SLURM: the signal of `--signal`, here SIGUSR1). The handler only sets a flag: the training loops
look at it between iterations, where stopping is safe, and the distillation agrees on one iteration for
every group (the teacher decides and tells the students in-band, see teacher/run.py). A second signal
changes nothing: the checkpoint that is being written is what makes the stop cheap.
"""

from __future__ import annotations

import logging
import signal
import threading

from dinodist.core.errors import DinodistError

# EX_TEMPFAIL: "try again later", which is what a preempted run asks of its launcher
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

log = logging.getLogger(__name__)
_requested = threading.Event()


class Preempted(DinodistError):
    """The run stopped on request after checkpointing iteration `iteration` (the next one to train)."""

    def __init__(self, message: str, iteration: int) -> None:
        super().__init__(message)
        self.iteration = iteration


def request(reason: str = "") -> None:
    if not _requested.is_set():
        log.warning("preemption requested%s: checkpointing at the next common iteration",
                    f" ({reason})" if reason else "")
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reset() -> None:
    """Forget a request (tests run several jobs in one process)."""
    _requested.clear()


def install_handlers() -> None:
    """SIGTERM and SIGUSR1 request preemption instead of killing the process (main thread only)."""
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, _frame: request(signal.Signals(signum).name))
