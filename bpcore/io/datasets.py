"""Small built-in datasets (no download) and loaders for users' own files."""

from __future__ import annotations

import csv
import math
import os
from typing import NamedTuple

import numpy as np

from ..errors import ConfigError, ShapeError

__all__ = ["load_digits", "make_spirals", "load_file", "load_table", "Table",
           "train_test_split", "DATASETS"]


def make_spirals(n_per_class: int = 300, n_classes: int = 3, noise: float = 0.15,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved 2-d spirals: ``X`` float32 ``(n, 2)``, ``y`` int64 ``(n,)``."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    t = np.linspace(0.0, 1.0, n_per_class)
    for c in range(n_classes):
        angle = 4.0 * t + 2.0 * math.pi * c / n_classes + rng.normal(0, noise, n_per_class) * t
        X.append(np.stack([t * np.sin(angle), t * np.cos(angle)], axis=1))
        y.append(np.full(n_per_class, c))
    return np.concatenate(X).astype(np.float32), np.concatenate(y).astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """The 8×8 digits (1797 × 64 raw pixel values 0-16, 10 classes) bundled with
    scikit-learn, as they come: any scaling is the caller's (and ``bpcore train`` records
    its own in the checkpoint, so ``bpcore predict`` takes the same raw values).

    Without scikit-learn, falls back to a synthetic 3-class spiral set. Returns
    ``(X, y, name)``.
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        X, y = make_spirals()
        return X, y, "spirals (synthetic; install scikit-learn for the 8x8 digits)"
    d = _sk_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64), "digits (8x8)"


class Table(NamedTuple):
    """A data file's contents: features ``X``, labels ``y`` (None: none in the file), the
    feature columns' names in ``X``'s order and the label column's name (None: the file
    names no columns)."""

    X: np.ndarray
    y: np.ndarray | None
    feature_names: list[str] | None
    label_name: str | None


def load_file(path: str, label_column: str | int | None = None, *,
              n_features: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(X, y)`` from a ``.npz`` (arrays ``X`` and ``y``) or a ``.csv``: :func:`load_table`
    without the column names."""
    return load_table(path, label_column, n_features=n_features)[:2]


def load_table(path: str, label_column: str | int | None = None, *,
               n_features: int | None = None,
               feature_names: list[str] | None = None,
               label_name: str | None = None) -> Table:
    """``Table(X, y, feature_names, label_name)`` from a ``.npz`` (arrays ``X`` and ``y``)
    or a ``.csv``.

    CSV: a header row is detected when its cells are not numbers. The label column is
    ``label_column`` (a name, or an index counted from 0; negative counts from the end), or
    else one named label/y/target/class, or the last.

    With ``n_features`` (prediction: the model's input width) labels are optional: a ``.npz``
    may lack ``y``, and a CSV of exactly ``n_features`` columns is features only (``y`` is
    None); any other width than ``n_features`` or ``n_features + 1`` is an error.

    With ``feature_names`` (the columns a model was trained on, in order) a CSV with a header
    is read **by name**: its columns may come in any order, ``X`` has them in this one, and
    the one column left over, if any, is the label (named ``label_name``, the training
    file's label column, or label/y/target/class; or given by ``label_column``). A named
    feature missing from the file, or any other column left over, is an error: the same
    numbers in another column order would be a silent wrong answer. (A CSV without a header
    is read by position.)

    ``Table.feature_names``: the file's header minus its label column, ``label_name`` that
    column's (None without a header).
    """
    if not os.path.exists(path):
        raise ConfigError(f"data: no file at {path!r}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:  # never unpickle user files
            need = ("X",) if n_features is not None else ("X", "y")
            missing = [k for k in need if k not in f.files]
            if missing:
                raise ShapeError(f"data: {path!r} must hold arrays {list(need)}"
                                 f"{' (and optionally y)' if n_features is not None else ''};"
                                 f" it has {f.files} (missing {missing})")
            X = np.asarray(f["X"])
            y = np.asarray(f["y"]) if "y" in f.files else None
        if X.ndim != 2:
            X = X.reshape(len(X), -1)
        if y is not None and len(X) != len(y):
            raise ShapeError(f"data: X has {len(X)} rows but y has {len(y)} in {path!r}")
        _check_width(path, X.shape[1], n_features, with_label=False)
        return Table(X, y, None, None)
    if path.endswith(".csv") or path.endswith(".txt"):
        return _load_csv(path, label_column, n_features, feature_names, label_name)
    raise ConfigError(f"data: {path!r}: expected a .npz (with X and y) or a .csv file")


def _check_width(path: str, width: int, n_features: int | None, with_label: bool) -> None:
    if n_features is not None and width != n_features:
        raise ShapeError(f"data: {path!r} has {width} feature columns"
                         f"{' besides the label' if with_label else ''}; the model takes "
                         f"{n_features}.")


def _label_index(label_column: str | int | None, header: list[str] | None, width: int,
                 path: str) -> int:
    if isinstance(label_column, str) and not label_column.lstrip("-").isdigit():
        if header is None or label_column not in header:
            raise ShapeError(f"data: label column {label_column!r} not found in {path!r} "
                             f"(header: {header})")
        return header.index(label_column)
    if label_column is not None:
        col = int(label_column)
        if not -width <= col < width:
            raise ShapeError(f"data: label column {col} does not exist: {path!r} has {width} "
                             f"columns (indices 0 to {width - 1}, or -1 to -{width} from the "
                             "end)")
        return col % width
    if header:
        names = [h.lower() for h in header]
        return next((names.index(n) for n in _LABEL_NAMES if n in names), width - 1)
    return width - 1


_LABEL_NAMES = ("label", "y", "target", "class")  # a label column's usual names


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def parse_labels(cells: list[str]) -> np.ndarray:
    """A label column's text as labels that round-trip exactly: integers (int64, or Python
    ints beyond its range), else floats, else the strings themselves."""
    cells = [c.strip() for c in cells]
    empty = [i for i, c in enumerate(cells) if not c]
    if empty:  # a missing label is no class called ""
        raise ShapeError(f"data: the label column is empty in {len(empty)} rows (data rows "
                         f"{empty[:10]}, counted from 0); fill or drop them")
    try:
        ints = [int(c) for c in cells]
    except ValueError:
        ints = None
    if ints is not None:
        if all(-2 ** 63 <= v < 2 ** 63 for v in ints):
            return np.array(ints, dtype=np.int64)
        return np.array(ints, dtype=object)  # exact, whatever the size
    if all(_is_number(c) for c in cells):
        y = np.array([float(c) for c in cells], dtype=np.float64)
        if np.all(np.isfinite(y)) and np.all(y == np.round(y)) and np.all(np.abs(y) < 2 ** 53):
            return y.astype(np.int64)  # "3.0": the class 3
        return y
    return np.array(cells, dtype=str)


def _load_csv(path: str, label_column: str | int | None, n_features: int | None,
              feature_names: list[str] | None, label_name: str | None) -> Table:
    # utf-8-sig: a byte-order mark (spreadsheets write one) is no part of the first cell;
    # left in, it turned a header-less file's first row into a "header" and renamed a column
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f, skipinitialspace=True)  # ("a", "b" too)
                    if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise ConfigError(f"data: {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                          f"offset {e.start}); save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")"
                          ) from None
    if not rows:
        raise ShapeError(f"data: {path!r} is empty")
    width = len(rows[0])
    # A header: a first row with a text cell where the next row has a number (a column of
    # string labels is text in every row), or any text cell when it is the only row.
    first_text = [not _is_number(c) for c in rows[0]]
    if len(rows) > 1 and len(rows[1]) == width:
        is_header = any(t and _is_number(c) for t, c in zip(first_text, rows[1]))
    else:
        is_header = any(first_text)
    header = [c.strip() for c in rows[0]] if is_header else None
    body = rows[1:] if header else rows
    if not body:
        raise ShapeError(f"data: {path!r} has a header and no rows")
    uneven = [i for i, r in enumerate(body) if len(r) != width]
    if uneven:
        raise ShapeError(f"data: {path!r}: rows have different numbers of cells (data row "
                         f"{uneven[0]} has {len(body[uneven[0]])}, the first row {width})")
    if header is not None and feature_names is not None:
        return _by_name(path, header, body, list(feature_names), label_column, label_name)
    if n_features is not None and width == n_features and label_column is None:
        return Table(_numeric(body, list(range(width)), path), None, header, None)  # no y
    if n_features is not None and width != n_features + 1:
        raise ShapeError(f"data: {path!r} has {width} columns; the model takes {n_features} "
                         f"features, so expected {n_features} (features only) or "
                         f"{n_features + 1} (features and a label).{_separator_hint(rows)}")
    if n_features is None and width < 2:
        raise ShapeError(f"data: {path!r} has one column; training needs the features and a "
                         f"label column.{_separator_hint(rows)}")
    col = _label_index(label_column, header, width, path)
    features = [c for c in range(width) if c != col]
    names = [header[c] for c in features] if header is not None else None
    return Table(_numeric(body, features, path), parse_labels([r[col] for r in body]), names,
                 header[col] if header is not None else None)


def _separator_hint(rows: list[list[str]]) -> str:
    """A hint where a one-column file's cells hold another separator (a European ';')."""
    sep = next((c for c in ";\t|" if len(rows[0]) == 1 and c in rows[0][0]), None)
    return f" Its cells seem separated by {sep!r}: save it with commas." if sep else ""


def _by_name(path: str, header: list[str], body: list[list[str]], names: list[str],
             label_column: str | int | None, label_name: str | None) -> Table:
    """The columns ``names`` of a CSV with a header, in that order, and the label column:
    ``label_column`` if given, else the one column left over (if any), which must be named
    ``label_name`` (the training file's) or label/y/target/class."""
    missing = [n for n in names if n not in header]
    twice = sorted({n for n in names if header.count(n) > 1})
    if missing or twice:
        raise ShapeError(
            f"data: {path!r} names its columns {header}; the model was trained on the "
            f"features {names}, in that order"
            + (f", and {missing} are missing" if missing else "")
            + (f", and {twice} appear more than once" if twice else "")
            + ". Give the file those columns (in any order), or drop its header row to "
              "read the columns by position.")
    features = [header.index(n) for n in names]
    rest = [c for c in range(len(header)) if c not in features]
    if label_column is not None:
        col = _label_index(label_column, header, len(header), path)
        if col in features:
            raise ShapeError(f"data: label column {label_column!r} of {path!r} is the "
                             f"model's feature {header[col]!r}")
        rest = [col] + [c for c in rest if c != col]
    elif rest:  # the one column left over is the label if it is named as one
        known = {n.lower() for n in (label_name, *_LABEL_NAMES) if n}
        if len(rest) > 1 or header[rest[0]].lower() not in known:
            raise ShapeError(
                f"data: {path!r} has columns {[header[c] for c in rest]} besides the "
                f"model's features {names}; only the label ("
                + (f"{label_name!r}, or " if label_name else "")
                + f"one named {'/'.join(_LABEL_NAMES)}) may be left over. Drop the others, "
                "or name the label column with --label-column.")
    y = parse_labels([r[rest[0]] for r in body]) if rest else None
    return Table(_numeric(body, features, path), y, names, header[rest[0]] if rest else None)


def _numeric(body: list[list[str]], columns: list[int], path: str) -> np.ndarray:
    """The feature columns as float64 (exactly as written, no narrowing)."""
    try:
        return np.array([[float(r[c]) for c in columns] for r in body], dtype=np.float64
                        ).reshape(len(body), len(columns))
    except ValueError as e:
        raise ShapeError(f"data: {path!r} has a non-numeric feature cell ({e})") from None


def train_test_split(X: np.ndarray, y: np.ndarray, test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random split: ``X_train, X_test, y_train, y_test``."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: expected a number in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = max(1, int(round(len(X) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]


DATASETS = {"digits": load_digits}
