"""Ray Tune sweeps over experiment fields, each trial a full Ray Train + DeepSpeed job, tracked in MLflow."""
