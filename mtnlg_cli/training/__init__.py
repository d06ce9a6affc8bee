"""Training: the trainer, the runtime that applies a parallel layout to the model, optimizer and metrics."""
