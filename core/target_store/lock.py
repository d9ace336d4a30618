"""One writer per target store: `writer.lock` in the store directory names the process that holds it.

Two writers appending to the same shards would interleave records, and a resume cutting records
while another writer appends would lose them, so a writer refuses a store another live process
holds. A holder that died (same host, pid gone or reused, or the host rebooted) cannot release its
lock; such a stale lock is taken over with a warning. A holder on another host cannot be checked
from here and is always refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import socket
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.core.procs import pid_alive
from dinodist.core.target_store import format as fmt

log = logging.getLogger(__name__)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _read(path: Path) -> dict | None:
    """The lock's content, None if it is gone; DinodistError if it cannot be understood."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DinodistError(f"{path}: cannot read target store lock ({e.strerror})") from e
    try:
        d = json.loads(raw)
        if not (isinstance(d, dict) and isinstance(d.get("host"), str) and isinstance(d.get("pid"), int)):
            raise ValueError("no host and pid")
    except ValueError as e:
        raise DinodistError(
            f"{path}: unreadable target store lock ({e}); remove it if no writer is running"
        ) from e
    return d


def _stale_reason(holder: dict) -> str | None:
    """Why the holder can no longer be writing, or None if it may be."""
    if holder["host"] != socket.gethostname():
        return None
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return "the host rebooted since"
    pid = holder["pid"]
    if not pid_alive(pid):
        return f"pid {pid} is not running"
    start = _pid_start(pid)
    if holder.get("pid_start") is not None and start is not None and holder["pid_start"] != start:
        return f"pid {pid} now belongs to another process"
    return None


def _describe(holder: dict) -> str:
    return f"pid {holder['pid']} on {holder['host']} (since {holder.get('started', '?')})"


class WriterLock:
    """Holds `<store>/writer.lock` until `release`."""

    def __init__(self, store: Path) -> None:
        self.path = store / fmt.LOCK_FILE
        self.token = secrets.token_hex(8)
        self.held = False
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "boot_id": _boot_id(),
            "pid_start": _pid_start(os.getpid()),
            "token": self.token,
        }
        self._content = json.dumps(me, sort_keys=True).encode()
        for _ in range(5):  # only a concurrent take-over or release makes a round fail
            if self._create():
                self.held = True
                return
            holder = _read(self.path)
            if holder is None:
                continue
            reason = _stale_reason(holder)
            if reason is None:
                here = holder["host"] == socket.gethostname()
                where = "" if here else " (another host: not checkable from here)"
                raise DinodistError(
                    f"{self.path}: target store is being written by {_describe(holder)}{where}; one writer "
                    "at a time (remove the lock only if that writer is gone)"
                )
            if self._take_over(holder):
                log.warning("%s: took over a stale target store lock of %s: %s", self.path, _describe(holder),
                            reason)
        raise DinodistError(
            f"{self.path}: cannot acquire the target store lock (other writers keep racing for it)"
        )

    def _create(self) -> bool:
        # Written under a private name and linked into place: the lock appears complete or not at
        # all, so a crash never leaves an empty lock that nobody could judge stale.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{self.token}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(self._content)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            raise DinodistError(f"{self.path}: cannot create target store lock ({e.strerror})") from e
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _take_over(self, holder: dict) -> bool:
        # Moved aside rather than unlinked: if another process replaced the stale lock with its own
        # since we read it, we notice (different content) and put theirs back instead of deleting it.
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            try:
                moved = _read(aside)
            except DinodistError:
                moved = None
            if moved != holder:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
        finally:
            aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent; a store directory removed under us is fine)."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot remove target store lock (%s)", self.path, e.strerror)
