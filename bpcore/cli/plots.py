"""The training curves ``bpcore train`` draws (loss, and accuracy for classifiers)."""

from __future__ import annotations

__all__ = ["training_curves"]


def training_curves(history, path: str, title: str, model) -> str | None:
    """Write the curves of a :class:`~bpcore.training.callbacks.History` to ``path`` (PNG); None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    acc = "accuracy" in history
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(10 if acc else 5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(history.epochs, history["loss"], label="train")
    if "val_loss" in history:
        ax.plot(history.epochs, history["val_loss"], label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax.legend()
    if acc:
        ax = axes[0][1]
        ax.plot(history.epochs, history["accuracy"], label="train")
        if "val_accuracy" in history:
            ax.plot(history.epochs, history["val_accuracy"], label="validation")
        ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        ax.legend()
    fig.suptitle(f"bpcore: {title}, {model.sizes}, {model.backend.name}/{model.dtype_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
