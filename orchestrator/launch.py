"""Start the local rank processes of a run and watch them.

Each rank is `python -m dinodist.orchestrator.runtime.rank ARGS` with torchrun-style env:// variables, so the
same entry point runs under an external torchrun (see `dinodist deploy`). A rank that exits
non-zero takes the job down: the orchestrator asks the launcher to stop the rest, which sends
SIGTERM and, after a grace period, SIGKILL to each rank's process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dinodist.core.control.client import CONTROL_ENV, CONTROL_RANK_ENV
from dinodist.core.errors import DinodistError
from dinodist.core.net import free_port

# the rank program (orchestrator/runtime/rank.py), named, not imported: the driver never loads the runtime
RANK_MODULE = "dinodist.orchestrator.runtime.rank"


@dataclass
class RankProcess:
    rank: int
    proc: subprocess.Popen
    log_path: Path
    returncode: int | None = None


class Launcher:
    """The local ranks of one job; `poll()` reports exits, `stop()` ends whatever is still running."""

    def __init__(self, ranks: list[RankProcess], master_port: int) -> None:
        self.ranks = ranks
        self.master_port = master_port

    def get(self, rank: int) -> RankProcess:
        """The process of `rank` (as the launcher names it)."""
        return next(r for r in self.ranks if r.rank == rank)

    def poll(self) -> list[tuple[int, int]]:
        """Ranks that exited since the last call, as (rank, exit code)."""
        exited = []
        for r in self.ranks:
            if r.returncode is None:
                code = r.proc.poll()
                if code is not None:
                    r.returncode = code
                    exited.append((r.rank, code))
        return exited

    def running(self) -> list[int]:
        self.poll()
        return [r.rank for r in self.ranks if r.returncode is None]

    def all_exited(self) -> bool:
        return not self.running()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every running rank, SIGKILL those still alive after `grace_s`."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running():
            self._signal_all(signal.SIGKILL)
            for r in self.ranks:
                if r.returncode is None:
                    r.proc.wait()
        self.poll()

    def kill(self, rank: int) -> None:
        """SIGKILL one rank's process group (a straggler after the grace period)."""
        r = self.get(rank)
        if r.proc.poll() is None:
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _signal_all(self, sig: int) -> None:
        for r in self.ranks:
            if r.returncode is None and r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def tail(self, rank: int, lines: int = 5) -> str:
        """Last lines of a rank's log, to quote in an error message."""
        path = self.get(rank).log_path
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def rank_env(rank: int, world_size: int, master_port: int, control_addr: str | None = None,
             extra: Mapping[str, str] | None = None, drop: Sequence[str] = ()) -> dict[str, str]:
    env = dict(os.environ)
    for name in drop:  # the job secret's variable: a rank gets its own control key instead
        env.pop(name, None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # ranks share a few cores: one intra-op thread each unless the user says otherwise
    env.setdefault("OMP_NUM_THREADS", "1")
    if control_addr:
        env[CONTROL_ENV] = control_addr
    if extra:
        env.update(extra)
    return env


def launch_ranks(world_size: int, args: Sequence[str], log_dir: str | Path, control_addr: str | None = None,
                 extra_env: Mapping[str, str] | None = None, module: str = RANK_MODULE,
                 names: Sequence[int] | None = None, log_suffix: str = "",
                 env_of: Callable[[int], Mapping[str, str]] | None = None,
                 drop_env: Sequence[str] = ()) -> Launcher:
    """Start `world_size` ranks of `python -m MODULE ARGS`, logs in `log_dir/rank-<r><suffix>.log`.

    `names`: how the launcher (and the logs) call ranks 0..world_size-1 of this world, e.g. the global
    ranks of a student group restarted as a world of its own; by default their world ranks.
    `env_of(name)`: what one rank's environment adds (its control-plane key: each rank gets its own).
    `drop_env`: variables of this process the ranks must not inherit (control.secret_env's).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    named = names is not None
    names = list(names) if named else list(range(world_size))
    ranks = []
    for rank in range(world_size):
        log_path = log_dir / f"rank-{names[rank]}{log_suffix}.log"
        env = dict(extra_env or {})
        if named:
            env[CONTROL_RANK_ENV] = str(names[rank])
        if env_of is not None:
            env.update(env_of(names[rank]))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=rank_env(rank, world_size, port, control_addr, env, drop=drop_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: a stop reaches the rank's children too
            )
        ranks.append(RankProcess(names[rank], proc, log_path))
    return Launcher(ranks, port)


def run_rank_check(args: Sequence[str], timeout_s: float) -> None:
    """Run the rank program once without a world (e.g. `--check`): raise its one-line error, if any.

    The driver uses this for checks that need the rank runtime's own view of a topology (the store
    check of `add-student`) without importing it.
    """
    cmd = [sys.executable, "-m", RANK_MODULE, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DinodistError(f"{RANK_MODULE} {' '.join(args)}: no answer within {timeout_s:g} s") from None
    if proc.returncode == 0:
        return
    lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
    errors = [line.split(": error: ", 1)[1] for line in lines if ": error: " in line]
    raise DinodistError(errors[-1] if errors else lines[-1])
