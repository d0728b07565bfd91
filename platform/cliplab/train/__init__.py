"""Training: DeepSpeed engine, per-worker loop, checkpoints, and the Ray TorchTrainer around them."""
