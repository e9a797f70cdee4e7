"""Training: the loop, its loss and target assignment, the optimizer and schedule, EMA, fine-tuning."""
