"""``bpcore train`` and ``bpcore predict``: what they do once their arguments are parsed."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

__all__ = ["cmd_train", "cmd_predict"]


def _enable_float64_if_needed(backend: str, dtype: str) -> None:
    """An application may switch a backend's float64 mode on for the whole process (JAX's
    64-bit flag, say); the backend says whether it needs to, and how."""
    from .. import backends

    be = backends.get(backend)
    if dtype == "float64" and be.float64_error() and be.enable_float64 is not None:
        be.enable_float64()


def _prepare_data(args, feature_names: list[str] | None = None,
                  label_name: str | None = None) -> tuple:
    """``X, y, classes, task, name, feature_names, label_name`` of the training data (a
    resumed run's CSV read by the checkpoint's column names, as ``bpcore predict`` reads
    it; the names None where the file has no header)."""
    from ..io.datasets import load_digits, load_table

    names = None
    if args.data:
        X, y, names, label_name = load_table(args.data, args.label_column,
                                             feature_names=feature_names,
                                             label_name=label_name)
        name = os.path.basename(args.data)
        if y is None:  # (a CSV read by the checkpoint's names, with no column left over)
            raise ValueError(f"--data: {args.data!r} has the model's features {names} and no "
                             "label column; training needs one")
        if names is not None and len(set(names)) != len(names):
            names = label_name = None  # (repeated column names: the columns go by position)
    else:
        X, y, name = load_digits()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    _refuse_nonfinite_rows(X, "--data: the features")
    if y.dtype.kind in "iubUSO":  # integers, booleans, strings: class labels
        classes, y = np.unique(y, return_inverse=True)
        task = "classification"
    else:
        classes, task = None, "regression"
        y = y.astype(np.float64)
        _refuse_nonfinite_rows(y, "--data: the regression targets")
    return X, y, classes, task, name, names, label_name


def _refuse_nonfinite_rows(a: np.ndarray, what: str) -> None:
    """Training data with NaN or inf is refused, naming the rows (as scikit-learn does)."""
    bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
    if bad.size:
        raise ValueError(f"{what}: {bad.size} of {len(a)} rows hold NaN or inf (rows "
                         f"{bad[:10].tolist()}{', ...' if bad.size > 10 else ''}, counted from 0,"
                         " header excluded); clean or drop them first")


def cmd_train(args) -> int:
    from .. import EarlyStopping, MLP, Trainer, optim
    from ..io.checkpoint import load_checkpoint
    from ..io.datasets import train_test_split
    from .plots import training_curves
    from ..io.preprocess import Standardize

    _check_resume_flags(args)
    resumed_names = (None, None)
    if args.resume:  # the checkpoint's dtype (a float64 run resumes in float64, on JAX too)
        resumed = load_checkpoint(args.resume)
        args.dtype = resumed.config.dtype
        resumed_names = _column_names(resumed.metadata, resumed.model.sizes[0])
    _enable_float64_if_needed(args.backend, args.dtype)
    X, y, classes, task, data_name, feature_names, label_name = _prepare_data(
        args, *resumed_names)
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
        _check_memory([X.shape[1], *args.hidden, n_out], args.dtype, args.optimizer,
                      args.batch_size)
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
        "task": task, "feature_names": feature_names, "label_name": label_name},
        preprocessing=pre)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"epochs": history.epochs, **history.metrics, "test": result}, f, indent=1)
    png = training_curves(history, os.path.join(args.out, "curves.png"), data_name, model)
    epochs_run = len(history.epochs)
    per_epoch = float(np.median(history["time"])) if epochs_run else 0.0
    acc = f"test accuracy {result['accuracy']:.4f}, " if "accuracy" in result else ""
    print(f"{acc}test loss {result['loss']:.4f}; {epochs_run} epochs in {elapsed:.2f}s "
          f"({per_epoch * 1000:.1f} ms/epoch median) on {model.backend.name}/{model.dtype_name}")
    print(f"wrote {ckpt}" + (f", {png}" if png else " (install matplotlib for curves.png)"))
    return 0


# What `train` uses when a flag is not given (the parser leaves these None, so that --resume
# can tell a flag given from a default).
_TRAIN_DEFAULTS = {"dtype": "float32", "hidden": [128, 64], "activation": "relu",
                   "optimizer": "adam"}
_FROM_CHECKPOINT = ("dtype", "hidden", "activation", "optimizer", "lr", "clip_norm")


def _check_resume_flags(args) -> None:
    """With --resume the network, dtype and optimizer are the checkpoint's: a flag that would
    change them is refused (silently ignoring it would train something else than asked).
    Without it, fill in the defaults."""
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in _FROM_CHECKPOINT
                 if getattr(args, k, None) is not None]
        if given:
            raise ValueError(f"--resume continues the checkpoint's network and optimizer "
                             f"exactly; {', '.join(given)} would change them and cannot be "
                             "applied to a resumed run. Drop them, or train afresh without "
                             "--resume (--epochs, --batch-size, --patience, --data and --out "
                             "do apply)")
        return
    for k, v in _TRAIN_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _check_memory(sizes: list, dtype: str, optimizer: str, batch_size: int) -> None:
    """Refuse, before allocating, a network that cannot fit in this machine's memory: its
    parameters, gradients, optimizer moments and one batch's activations."""
    n_params = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    copies = 2 + {"adam": 2, "adamw": 2, "momentum": 1}.get(optimizer, 0)
    itemsize = 4 if dtype == "float32" else 8
    need = itemsize * (copies * n_params + 3 * batch_size * sum(sizes))
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ValueError(f"--hidden: a network of sizes {sizes} has {n_params:,} parameters; "
                         f"training it ({optimizer}, {dtype}) needs about {need / 2**30:,.1f} "
                         f"GiB, and this machine has {have / 2**30:,.1f} GiB. Use smaller "
                         "widths.")


def _legacy_scaling(ckpt):
    """The input scaling of a checkpoint written by an earlier `bpcore train` (kept in its
    user metadata), or None."""
    from ..io.preprocess import from_spec

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
            not all(isinstance(c, (int, float, str)) and not isinstance(c, bool)
                    for c in classes)):
        raise ValueError(f"the checkpoint's class list is malformed (expected {n_out} labels)")
    kinds = {type(c) for c in classes}
    if len(kinds) > 1:
        raise ValueError(f"the checkpoint's class list mixes types "
                         f"{sorted(k.__name__ for k in kinds)}")
    if kinds == {int} and all(-2 ** 63 <= c < 2 ** 63 for c in classes):
        return np.array(classes, dtype=np.int64)
    return np.array(classes, dtype=object if kinds == {int} else None)


def _column_names(meta: dict, n_features: int) -> tuple[list[str] | None, str | None]:
    """The names of the columns the model was trained on and of its label column (a
    CSV's header), or Nones."""
    names, label = meta.get("feature_names"), meta.get("label_name")
    if names is None:
        return None, None
    if (not isinstance(names, list) or len(names) != n_features or
            not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)
            or not isinstance(label, (str, type(None)))):
        raise ValueError(f"the checkpoint's feature_names are malformed (expected {n_features}"
                         " distinct column names, and a label_name)")
    return names, label


def _text(v) -> str:
    """One output cell, exact: integers and strings as themselves, floats in the shortest
    form that reads back to the same value (of their own precision)."""
    if isinstance(v, (np.floating, float)):
        return str(v) if isinstance(v, np.floating) else repr(v)
    return str(v)


def cmd_predict(args) -> int:
    import csv

    from ..io.checkpoint import load_checkpoint
    from ..io.datasets import load_table

    ckpt = load_checkpoint(args.checkpoint, backend=args.backend)
    meta, model = ckpt.metadata, ckpt.model
    # a CSV with a header is read by the training columns' names (any order)
    feature_names, label_name = _column_names(meta, model.sizes[0])
    X, y, _, _ = load_table(args.data, args.label_column, n_features=model.sizes[0],
                            feature_names=feature_names, label_name=label_name)
    pre = ckpt.preprocessing or _legacy_scaling(ckpt)
    X = np.asarray(X, dtype=np.float64) if pre is None else pre(X)
    # what Python's model.predict gives, or its clear error (rows with NaN or inf included)
    pred = model.predict(X)
    if model.task == "classes":
        classes = _class_names(meta, model.sizes[-1])
        labels = classes[pred] if classes is not None else pred
    else:
        labels = pred  # 0/1 per label (binary), or the values (regression)
    if y is not None and model.task in ("classes", "binary"):
        truth = np.asarray(y).reshape(len(y), -1)
        got = np.asarray(labels).reshape(len(labels), -1)
        if truth.shape == got.shape:
            numeric = got.dtype.kind in "iub" and truth.dtype.kind in "iub"
            same = got == truth if numeric else (  # labels of any type: as text
                np.vectorize(str)(got) == np.vectorize(str)(truth))
            print(f"accuracy {np.mean(same):.4f} on {len(X)} samples", file=sys.stderr)
    rows = np.asarray(labels).reshape(len(labels), -1)
    if args.out and args.out.endswith(".npy"):
        out = np.asarray(labels)
        if out.dtype == object:  # integers beyond int64: exact as text (np.save would pickle)
            out = out.astype(str)
        np.save(args.out, out, allow_pickle=False)
        return 0
    f = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        writer = csv.writer(f, lineterminator="\n")
        for row in rows:
            writer.writerow([_text(v) for v in row])
    finally:
        if args.out:
            f.close()
    return 0
