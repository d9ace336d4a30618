"""Whether a process is alive, as the supervisor and the target store's writer lock both need to know."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process `pid` of this host runs; an exited child not yet reaped (a zombie) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # a zombie still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
