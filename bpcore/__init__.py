"""bpcore: hand-written, matrix-form backpropagation for MLPs on any array-API backend."""

from __future__ import annotations

__version__ = "0.1.0"


def _source_checkout_path() -> None:
    """Run in place from a source checkout (Python started in the repository, so this
    folder shadows the installed package): ``bpcore.backends`` and ``bpcore.benchmarks``
    are the repository's ``backends/`` and ``benchmarks/``, which an install maps into the
    package (``[tool.setuptools.package-dir]``); without this, ``import bpcore`` there
    failed with a circular-import error."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if (not os.path.isdir(os.path.join(here, "backends"))
            and os.path.isfile(os.path.join(root, "backends", "__init__.py"))):
        __path__.append(root)  # noqa: F821  (a package's own __path__)


_source_checkout_path()

from . import errors  # noqa: E402  (first: the backends import it)
from . import backends  # noqa: E402
from .nn import activations, losses  # noqa: E402
from . import optim  # noqa: E402
from .nn.activations import ACTIVATIONS, Activation  # noqa: E402
from .io.checkpoint import Checkpoint, load, load_checkpoint, save  # noqa: E402
from .nn.gradcheck import GradcheckResult, gradcheck  # noqa: E402
from .nn.losses import LOSSES, Loss  # noqa: E402
from .nn.mlp import backward, forward, forward_cache, loss_and_grad  # noqa: E402
from .nn.model import MLP, value_and_grad  # noqa: E402
from .optim import OPTIMIZERS  # noqa: E402
from .io.config import TrainConfig  # noqa: E402
from .training.step import TrainState  # noqa: E402
from .training.trainer import Callback, EarlyStopping, History, Trainer, train_step  # noqa: E402

__all__ = [
    "__version__", "errors", "backends", "activations", "losses", "optim",
    "ACTIVATIONS", "Activation", "LOSSES", "Loss", "OPTIMIZERS",
    "MLP", "forward", "forward_cache", "backward", "loss_and_grad", "value_and_grad",
    "save", "load", "load_checkpoint", "Checkpoint",
    "Trainer", "train_step", "TrainState", "TrainConfig", "History", "Callback", "EarlyStopping", "gradcheck", "GradcheckResult",
]
