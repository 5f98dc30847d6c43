"""The training loop: the run's story, the step, evaluation, the optimizer."""
