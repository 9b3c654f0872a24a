"""Hyperparameter sweeps with Ray Tune over any fine-tuning or pretraining config, every trial in MLflow."""
