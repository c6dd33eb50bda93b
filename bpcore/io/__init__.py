"""Files: checkpoints, the training config, atomic writes, datasets, preprocessing."""
