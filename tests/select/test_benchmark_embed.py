"""The embedding benchmark's worker-memory probe: a `ray::`-titled descendant's role and kernel peak RSS.

The benchmark's own smoke run (`benchmarks/selection.py --smoke`) starts two fresh local Rays and takes minutes
on 2 cores, too slow for the suite; this checks the part its memory figures rest on, on a stand-in process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from worker_peaks import WorkerPeaks  # benchmarks/ is not a package: imported from its folder

# 300 MiB touched and freed before the probe starts: only the kernel's high-water mark still holds it
HOLD = "x = bytearray(300 << 20); del x; print(flush=True); import time; time.sleep(60)"


def test_worker_peaks_reads_the_kernel_high_water_mark_and_the_role_from_the_title():
    title = "ray::MapBatches(read_and_decode)"
    cmd = f'exec -a "{title}" {sys.executable} -c "{HOLD}"'
    worker = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE)
    other = subprocess.Popen(["sleep", "60"])  # not a Ray worker: no `ray::` title
    try:
        worker.stdout.readline()  # freed
        with WorkerPeaks() as peaks:
            pass
        # the suite's own session Ray may have idle `ray::` workers under this process too: look only at ours
        assert worker.pid in peaks.workers and other.pid not in peaks.workers
        assert peaks.workers[worker.pid].role() == "read"
        assert peaks.workers[worker.pid].peak_mib >= 300
    finally:
        worker.kill()
        other.kill()
        worker.wait()
        other.wait()
