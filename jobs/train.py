"""`ray job submit ... -- python jobs/train.py --config configs/X.yaml [--set k=v ...] [--resume RUN]`.

Connects to the cluster the job runs in (RAY_ADDRESS, set by the job server), trains, exits non-zero
with the reason on stderr on failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, where jobs/select.py would shadow the standard library's
# `select`; the package comes from platform/ instead (a working_dir upload is not installed).
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cliplab.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
