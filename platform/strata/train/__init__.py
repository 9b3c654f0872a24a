"""Ray Train: the worker loops (pretraining, fine-tuning), their drivers, and the machinery both share."""
