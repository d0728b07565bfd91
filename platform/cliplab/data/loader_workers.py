"""DataLoader worker processes that never outlive their Ray Train worker.

A SIGKILLed Ray worker leaves its forked DataLoader children behind (parent PID 1). They hold the
worker's inherited sockets (gloo peers, the raylet connection), so neither the surviving ranks nor
Ray learn that the worker died, and the run hangs. Each DataLoader worker therefore asks the kernel
to kill it when its parent dies, and swaps every inherited socket for /dev/null so that the parent's
connections close as soon as the parent itself is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux); exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died between fork and prctl
        os._exit(1)


def release_inherited_sockets() -> int:
    """Point every socket descriptor inherited from the parent at /dev/null; returns how many.

    dup2 rather than close: Python objects in this process that still own those descriptor numbers may
    close them later, which must not hit a descriptor opened since.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    released = 0
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd == devnull:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
                    released += 1
            except OSError:  # the listing's own descriptor, already closed
                continue
    finally:
        os.close(devnull)
    return released


class LoaderWorkerInit:
    """`worker_init_fn` for the train DataLoader: die with the Ray worker, keep none of its sockets."""

    def __init__(self, parent_pid: int):
        self.parent_pid = parent_pid

    def __call__(self, worker_id: int) -> None:
        if not sys.platform.startswith("linux"):  # prctl and /proc are Linux's
            return
        die_with_parent(self.parent_pid)
        release_inherited_sockets()
