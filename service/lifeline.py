"""Processes that end with the one that started them (Linux), so that a supervisor that is
itself killed (SIGKILL, the OOM killer) leaves nothing behind: its workers went on taking
jobs from Redis, and a private redis-server went on holding its port and memory, for good;
a restarted ``serve --all-in-one`` then ran beside them. No torch."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies, and say whether
    ``parent`` is still the parent (False: it died before the request, which then never
    fires). SIGTERM lets a worker finish its job first (RQ's warm shutdown). The signal
    comes when the parent's thread that started this process ends, so a supervisor starts
    its children from threads that live as long as it does. A no-op, True, off Linux."""
    if not sys.platform.startswith("linux"):
        return True
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return os.getppid() == parent


def ending_with(parent: int) -> None:
    """A ``preexec_fn`` (in the child, before exec) for a program that cannot ask itself,
    such as redis-server: the request survives exec; a parent already gone ends the child."""
    if not end_with_parent(parent):
        os._exit(1)
