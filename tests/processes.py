"""Finding the processes a test's own local Ray started, to kill them by PID (fault injection)."""

from __future__ import annotations

import psutil


def train_workers() -> list[psutil.Process]:
    """This test process's Ray Train worker processes (the local Ray's raylet is our child).

    Their forked DataLoader workers carry the same process title; they are the ones whose parent is a worker.
    """
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    pids = {p.pid for p in found}
    return [p for p in found if p.ppid() not in pids]
