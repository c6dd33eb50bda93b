"""Training: the state and its guarded step, the in-place executor, the Trainer, the fit loop, callbacks."""
