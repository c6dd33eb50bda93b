"""The ``bpcore`` command: ``train``, ``predict``, ``info`` and ``bench``.

``bpcore train`` with no arguments trains a small MLP on a built-in dataset (scikit-learn's
8×8 digits, or synthetic spirals without scikit-learn), shows progress, prints the test
accuracy and time, and writes a checkpoint, the history and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Sequence

import numpy as np

from .errors import BpcoreError

DEFAULT_OUT = "bpcore-run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 256,256, "
                                         f"got {text!r}")
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive widths like 256,256, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from . import ACTIVATIONS, OPTIMIZERS, __version__

    p = _Parser(prog="bpcore", description="Hand-written backprop MLPs on NumPy/JAX/PyTorch/CuPy.")
    p.add_argument("--version", action="version", version=f"bpcore {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train an MLP (default: the built-in digits dataset)")
    t.add_argument("--backend", default="numpy", help="numpy, jax, torch, cupy, ... "
                   "(see `bpcore info`; default numpy)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    t.add_argument("--hidden", type=_hidden, default=[128, 64], help="widths, e.g. 256,256")
    t.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    t.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default 1e-3 for adam/adamw, 0.05 for sgd/momentum)")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", default=None, help=".npz with X and y, or .csv with a label column")
    t.add_argument("--label-column", default=None,
                   help="CSV label column: a name, or an index from 0 (negative: from the end); "
                        "default: label/y/target/class, else the last column")
    t.add_argument("--patience", type=_positive_int, default=None,
                   help="stop once the validation loss (val_loss) has not improved for this "
                        "many epochs, and keep the best epoch's weights")
    t.add_argument("--clip-norm", type=_positive_float, default=None)
    t.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    t.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    pr = sub.add_parser("predict", help="predict with a saved checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("--data", required=True,
                    help=".npz with X (and optionally y), or .csv of the model's features "
                         "(optionally plus a label column); raw values, as given to train")
    pr.add_argument("--label-column", default=None,
                    help="CSV label column (name or index), when there is one")
    pr.add_argument("--backend", default="numpy")
    pr.add_argument("--out", default=None, help="write predictions here (.npy or .csv)")

    sub.add_parser("info", help="backends, devices, BLAS and versions on this machine")

    sub.add_parser("bench", help="run the benchmark suite (quick profile by default; "
                   "`bpcore bench --help` for its options)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options belong to the benchmark runner
        argv, bench_args = argv[:1], argv[1:]
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.args = bench_args
    try:
        return {"train": cmd_train, "predict": cmd_predict, "info": cmd_info,
                "bench": cmd_bench}[args.command](args)
    except (BpcoreError, OSError, ValueError, ImportError) as e:
        print(f"bpcore {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bpcore {args.command}: interrupted", file=sys.stderr)
        return 130


def _enable_float64_if_needed(backend: str, dtype: str) -> None:
    """An application may switch a backend's float64 mode on for the whole process (JAX's
    64-bit flag, say); the backend says whether it needs to, and how."""
    from . import backends

    be = backends.get(backend)
    if dtype == "float64" and be.float64_error() and be.enable_float64 is not None:
        be.enable_float64()


def _prepare_data(args) -> tuple:
    from .datasets import load_digits, load_file

    if args.data:
        X, y = load_file(args.data, args.label_column)
        name = os.path.basename(args.data)
    else:
        X, y, name = load_digits()
    X = np.asarray(X, dtype=np.float64)
    if np.issubdtype(np.asarray(y).dtype, np.integer):
        classes, y = np.unique(y, return_inverse=True)
        task = "classification"
    else:
        classes, task = None, "regression"
    return X, np.asarray(y), classes, task, name


def cmd_train(args) -> int:
    from . import EarlyStopping, MLP, Trainer, optim
    from .checkpoint import load_checkpoint
    from .datasets import train_test_split
    from .preprocess import Standardize

    _enable_float64_if_needed(args.backend, args.dtype)
    X, y, classes, task, data_name = _prepare_data(args)
    X_trval, X_test, y_trval, y_test = train_test_split(X, y, 0.2, seed=args.seed)
    X_train, X_val, y_train, y_val = train_test_split(X_trval, y_trval, 0.125, seed=args.seed)
    loss = "softmax_cross_entropy" if task == "classification" else "mse"
    if task == "regression" and y.ndim == 1:
        y_train, y_val, y_test = (a.reshape(-1, 1) for a in (y_train, y_val, y_test))
    n_out = len(classes) if task == "classification" else y_train.shape[1]

    if args.resume:
        ckpt = load_checkpoint(args.resume, backend=args.backend)
        trainer = Trainer.from_checkpoint(ckpt)
        pre = ckpt.preprocessing or _legacy_scaling(ckpt)
        if pre is None:
            raise ValueError(f"--resume: {args.resume!r} was not written by `bpcore train` "
                             "(no input scaling recorded); resume it from Python with "
                             "bpcore.Trainer.resume")
        if trainer.model.sizes[0] != X.shape[1] or trainer.model.sizes[-1] != n_out:
            raise ValueError(f"--resume: the checkpoint's network {trainer.model.sizes} does "
                             f"not fit this data ({X.shape[1]} features, {n_out} outputs)")
    else:
        pre = Standardize.fit(X_train)
        model = MLP([X.shape[1], *args.hidden, n_out], args.activation, "identity",
                    backend=args.backend, dtype=args.dtype, seed=args.seed)
        lr = args.lr or (1e-3 if args.optimizer in ("adam", "adamw") else 0.05)
        trainer = Trainer(model, loss, optim.get_optimizer(args.optimizer, lr=lr),
                          clip_norm=args.clip_norm)
    scale = pre

    model = trainer.model
    stopper = EarlyStopping("val_loss", patience=args.patience) if args.patience else None
    callbacks = [stopper] if stopper else []
    os.makedirs(args.out, exist_ok=True)
    if not args.quiet:
        print(f"bpcore train: {data_name}, {len(X_train)} train / {len(X_val)} validation / "
              f"{len(X_test)} test samples; {model!r}", file=sys.stderr)
    t0 = time.perf_counter()
    history = trainer.fit(scale(X_train), y_train, epochs=args.epochs,
                          batch_size=args.batch_size, validation_data=(scale(X_val), y_val),
                          seed=args.seed, callbacks=callbacks, verbose=0 if args.quiet else 1)
    elapsed = time.perf_counter() - t0
    if stopper is not None and stopper.stopped_epoch is not None:
        print(f"early stopping: val_loss did not improve for {args.patience} epochs; stopped "
              f"after epoch {stopper.stopped_epoch} and kept epoch {stopper.best_epoch} "
              f"(val_loss {stopper.best:.4f})", file=sys.stderr)
    result = trainer.evaluate(scale(X_test), y_test)

    ckpt = os.path.join(args.out, "model.safetensors")
    trainer.save(ckpt, metadata={
        "dataset": data_name, "classes": None if classes is None else classes.tolist(),
        "task": task}, preprocessing=pre)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"epochs": history.epochs, **history.metrics, "test": result}, f, indent=1)
    png = _plot(history, os.path.join(args.out, "curves.png"), data_name, model)
    epochs_run = len(history.epochs)
    per_epoch = float(np.median(history["time"])) if epochs_run else 0.0
    acc = f"test accuracy {result['accuracy']:.4f}, " if "accuracy" in result else ""
    print(f"{acc}test loss {result['loss']:.4f}; {epochs_run} epochs in {elapsed:.2f}s "
          f"({per_epoch * 1000:.1f} ms/epoch median) on {model.backend.name}/{model.dtype_name}")
    print(f"wrote {ckpt}" + (f", {png}" if png else " (install matplotlib for curves.png)"))
    return 0


def _plot(history, path: str, title: str, model) -> str | None:
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


def _legacy_scaling(ckpt):
    """The input scaling of a checkpoint written by an earlier `bpcore train` (kept in its
    user metadata), or None."""
    from .preprocess import from_spec

    meta = ckpt.metadata
    if "input_mean" not in meta:
        return None
    return from_spec({"kind": "standardize", "mean": meta.get("input_mean"),
                      "std": meta.get("input_std")}, ckpt.model.sizes[0])


def _class_names(meta: dict, n_out: int):
    classes = meta.get("classes")
    if classes is None:
        return None
    if (not isinstance(classes, list) or len(classes) != n_out or
            not all(isinstance(c, (int, float, str)) for c in classes)):
        raise ValueError(f"the checkpoint's class list is malformed (expected {n_out} labels)")
    return np.asarray(classes)


def cmd_predict(args) -> int:
    from .checkpoint import load_checkpoint
    from .datasets import load_file

    ckpt = load_checkpoint(args.checkpoint, backend=args.backend)
    meta, model = ckpt.metadata, ckpt.model
    X, y = load_file(args.data, args.label_column, n_features=model.sizes[0])
    pre = ckpt.preprocessing or _legacy_scaling(ckpt)
    X = np.asarray(X, dtype=np.float64) if pre is None else pre(X)
    out = model.backend.to_numpy(model(X))
    if model.task in ("classes", None) and ckpt.config.loss != "mse":
        pred = np.argmax(out, axis=1)
        classes = _class_names(meta, model.sizes[-1])
        labels = classes[pred] if classes is not None else pred
        if y is not None:
            print(f"accuracy {np.mean(labels == np.asarray(y)):.4f} on {len(X)} samples",
                  file=sys.stderr)
    else:
        labels = out
    if args.out:
        if args.out.endswith(".npy"):
            np.save(args.out, labels)
        else:
            np.savetxt(args.out, np.atleast_2d(labels.T).T, delimiter=",", fmt="%g")
    else:
        for row in np.atleast_2d(labels.T).T:
            print(",".join(f"{v:g}" for v in np.atleast_1d(row)))
    return 0


def machine_info() -> dict:
    """Backends, devices, BLAS and library versions (also recorded by the benchmarks)."""
    from . import __version__, backends

    info = {"bpcore": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "backends": {}, "unavailable": backends.reasons(), "blas": []}
    for name in backends.available():
        be = backends.get(name)
        info["backends"][name] = {"version": be.version, "device": str(be.device)}
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads",
                                               "architecture", "filepath")}
                        for d in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    info["env"] = {k: os.environ[k] for k in sorted(os.environ)
                   if k.startswith(("OPENBLAS", "OMP_", "MKL_", "XLA_", "JAX_"))}
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cmd_info(args) -> int:
    info = machine_info()
    print(f"bpcore {info['bpcore']} on Python {info['python']}, {info['platform']}")
    print(f"cpu: {info['cpu']} ({info['cores']} cores)")
    for name, d in info["backends"].items():
        print(f"  {name:<17} available  {d['version']:<14} device {d['device']}")
    for name, why in info["unavailable"].items():
        print(f"  {name:<17} unavailable: {why}")
    if isinstance(info["blas"], list):
        for d in info["blas"]:
            print(f"blas: {d['internal_api']} {d['version']} threads={d['num_threads']} "
                  f"arch={d['architecture']}")
    else:
        print(f"blas: {info['blas']}")
    for k, v in info["env"].items():
        print(f"env: {k}={v}")
    return 0


def cmd_bench(args) -> int:
    from .benchmarks.__main__ import main as bench_main

    return bench_main(args.args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
