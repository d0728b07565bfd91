"""Experiment tracking: MLflow runs written by the driver and rank 0, and the plots logged there."""
