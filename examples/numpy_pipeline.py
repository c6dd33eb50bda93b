"""bpcore as the training core of a plain NumPy pipeline.

Your own code does the data work (loading, splitting, scaling, batching) with NumPy;
bpcore does forward, backward and update. The loop below is yours: bpcore only provides
``Trainer.step`` and the model.

    python examples/numpy_pipeline.py
"""

from __future__ import annotations

import sys

import numpy as np

import bpcore
from bpcore.io.datasets import make_spirals


def main(argv: list[str] | None = None, epochs: int = 60) -> float:
    X, y = make_spirals(n_per_class=200, n_classes=3, seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(X))
    X, y = X[order], y[order]
    split = int(0.8 * len(X))
    X_train, X_test, y_train, y_test = X[:split], X[split:], y[:split], y[split:]

    mean, std = X_train.mean(0), X_train.std(0)  # the pipeline's own preprocessing
    X_train, X_test = (X_train - mean) / std, (X_test - mean) / std

    model = bpcore.MLP([2, 64, 64, 3], activation="tanh", backend="numpy", seed=0)
    trainer = bpcore.Trainer(model, loss="softmax_cross_entropy",
                             optimizer=bpcore.optim.adam(bpcore.optim.cosine_decay(0.01, epochs * 15)))
    for epoch in range(epochs):
        perm = rng.permutation(len(X_train))
        for i in range(0, len(perm), 32):
            batch = perm[i:i + 32]
            loss = trainer.step(X_train[batch], y_train[batch])
        if (epoch + 1) % 20 == 0:
            print(f"epoch {epoch + 1}: last batch loss {float(loss):.4f}")
    logits = model(X_test)  # a NumPy array on the numpy backend
    acc = float(np.mean(np.argmax(logits, axis=1) == y_test))
    print(f"test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    main(sys.argv[1:])
