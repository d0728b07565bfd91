"""Which child runs a restored sweep treats as done: only a run that trained to its end (real sqlite store)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from cliplab.sweep.trial import STATUS_TAG, finished_result


def _child(client: MlflowClient, status: str, tag: str) -> str:
    run = client.create_run(client.create_experiment(f"e-{status}-{tag}"), tags={STATUS_TAG: tag})
    client.log_metric(run.info.run_id, "loss", 3.0, step=2)
    client.log_metric(run.info.run_id, "loss", 1.5, step=4)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_a_finished_child_gives_its_final_metrics_at_the_last_step(mlflow_uri) -> None:
    client = MlflowClient(mlflow_uri)
    assert finished_result(client, _child(client, "FINISHED", "TERMINATED"), steps=4) == {"loss": 1.5, "step": 4}


def test_an_unfinished_failed_or_stopped_child_is_trained_again(mlflow_uri) -> None:
    client = MlflowClient(mlflow_uri)
    running = client.create_run(client.create_experiment("e-running"), tags={STATUS_TAG: "RUNNING"}).info.run_id
    assert finished_result(client, running, steps=4) is None
    assert finished_result(client, _child(client, "FAILED", "ERROR"), steps=4) is None
    assert finished_result(client, _child(client, "KILLED", "EARLY_STOPPED"), steps=4) is None
    assert finished_result(client, _child(client, "FINISHED", "RUNNING"), steps=4) is None
