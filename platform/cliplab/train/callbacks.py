"""Ray Train callbacks, kept apart from the trainer so that the controller imports no training code.

Callbacks reach Ray Train's controller actor pickled by reference: unpickling one imports its module. A
callback defined next to the training loop made every controller import torch, DeepSpeed, open_clip and
MLflow (seconds of start-up, before the controller starts the worker group); this module needs Ray only.
"""

from __future__ import annotations

from typing import Any

import ray.train

from cliplab.errors import StorageError


class StopOnStorageError(ray.train.UserCallback):
    """Fail the run at once when a worker hit a storage error (outage past its budget, refused credentials).

    A worker-group restart would only wait out the same outage again (or be refused again), multiplying
    the time to fail by `scaling.max_failures`. Ray Train's controller treats an error raised here as
    its own, which it does not retry.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            if isinstance(error, StorageError):
                raise error
