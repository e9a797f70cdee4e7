"""Training engine: the loss, the training loop, evaluation, checkpoints."""
