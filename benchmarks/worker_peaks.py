"""Peak RSS of every Ray worker process under this driver, sampled from the kernel's own high-water mark.

A local Ray's workers are descendants of the driver (driver -> raylet -> workers) whose process title starts
with `ray::` (`ray::IDLE`, `ray::MapBatches(read_and_decode)`, `ray::MapWorker(...)`; the node's agents have such
titles too and are left out). A background thread lists them every `interval` seconds and reads each one's
`VmHWM` from `/proc/PID/status`: the peak resident set the kernel recorded since the process started, so a spike
between two samples is not missed; only a worker that lives less than one interval can be. The titles seen per
worker say what it ran (its role).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil

# title substring -> role (the embedding pass's, then the scoring pass's); anything else: other
ROLES = (("actor", "MapWorker"), ("read", "read_and_decode"), ("read", "read_rows"))
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # the node's agents carry `ray::` titles but run no work


@dataclass
class Worker:
    """One Ray worker process: its peak RSS in MiB and the titles it was seen with."""

    pid: int
    peak_mib: float = 0.0
    titles: set[str] = field(default_factory=set)

    def role(self) -> str:
        """`actor` (embedding, scoring or negCLIPLoss window actors), `read` (read tasks) or `other`."""
        for role, needle in ROLES:
            if any(needle in t for t in self.titles):
                return role
        return "other"


def _hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class WorkerPeaks:
    """Samples the peak RSS of this process's Ray workers until stopped (use as a context manager)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.workers: dict[int, Worker] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-peaks", daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the last word, while the workers still run

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Read the title and VmHWM of every live `ray::` descendant once."""
        for proc in psutil.Process().children(recursive=True):
            try:
                title = " ".join(proc.cmdline()).strip()  # setproctitle pads the title with spaces
                if not title.startswith("ray::") or title in AGENTS:
                    continue
                peak = _hwm_mib(proc.pid)
            except (psutil.Error, OSError):  # exited between the listing and the read
                continue
            w = self.workers.setdefault(proc.pid, Worker(proc.pid))
            w.peak_mib = max(w.peak_mib, peak)
            w.titles.add(title)

    def by_role(self) -> dict[str, float]:
        """The largest peak RSS (MiB) among the workers of each role seen."""
        out: dict[str, float] = {}
        for w in self.workers.values():
            out[w.role()] = max(out.get(w.role(), 0.0), w.peak_mib)
        return out
