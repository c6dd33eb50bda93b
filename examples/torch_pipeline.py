"""bpcore on a PyTorch tensor pipeline: a torch DataLoader feeds a bpcore model.

The batches are torch tensors. With ``backend="torch"`` the model computes on torch
tensors (on the GPU when one is present); with ``backend="numpy"`` the same tensors are
taken through DLPack at the API boundary. No torch autograd is involved: bpcore's
hand-written backward pass computes the gradients.

    pip install torch; python examples/torch_pipeline.py [numpy|torch]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import bpcore
from bpcore.io.datasets import make_spirals


def main(argv: list[str] | None = None, epochs: int = 40) -> float:
    backend = (argv or ["torch"])[0]
    X, y = make_spirals(n_per_class=200, n_classes=3, seed=2)
    data = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    loader = DataLoader(data, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))

    model = bpcore.MLP([2, 64, 64, 3], activation="relu", backend=backend, seed=0)
    trainer = bpcore.Trainer(model, "softmax_cross_entropy", bpcore.optim.adam(5e-3))
    for epoch in range(epochs):
        for xb, yb in loader:  # torch tensors straight from the DataLoader
            trainer.step(xb, yb)
    logits = model.backend.to_numpy(model(torch.from_numpy(X)))
    acc = float(np.mean(np.argmax(logits, axis=1) == y))
    print(f"backend {backend}: training accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main(sys.argv[1:])
