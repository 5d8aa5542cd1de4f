"""Training: the one training loop (accelerate, checkpoints, exact resume), optimiser and schedule, metrics."""
