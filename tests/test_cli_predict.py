"""``bpcore predict`` gives what ``model.predict`` gives, with labels exactly as trained on,
in every output format, or a clear error; and ``bpcore train``'s flags say which one is wrong.
Each test here failed before its fix (a hostile probe's findings)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import bpcore
from bpcore import optim
from bpcore.cli import main
from bpcore.io.preprocess import Standardize


def _blobs(n=60, k=2, d=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.standard_normal((n, d)) + 3.0 * y[:, None]
    return X, y


def _write_csv(path, X, labels=None, header=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow([f"f{i}" for i in range(X.shape[1])] + (["label"] if labels is not None
                                                                 else []))
        for i, row in enumerate(X):
            w.writerow([repr(float(v)) for v in row] + ([labels[i]] if labels is not None
                                                        else []))


def _train(tmp_path, data, capsys, *extra):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--epochs", "30", "--hidden", "16",
                 "--batch-size", "8", "--out", str(out), "--quiet", *extra]) == 0
    capsys.readouterr()
    return out / "model.safetensors"


def _predict(ckpt, data, capsys, *extra):
    rc = main(["predict", str(ckpt), "--data", str(data), *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("labels", [[1234567, 7654321], [-3, 2 ** 62],
                                    [12345678901234567890123, 7], ["cat", "dog, grey"]])
def test_labels_round_trip_exactly(tmp_path, capsys, labels):
    X, y = _blobs()
    names = [labels[i] for i in y]
    data = tmp_path / "d.csv"
    _write_csv(data, X, names)
    ckpt = _train(tmp_path, data, capsys)
    rc, out, err = _predict(ckpt, data, capsys)
    assert rc == 0, err
    got = [row[0] for row in csv.reader(out.splitlines())]
    assert set(got) <= {str(v) for v in labels} and len(got) == len(X)
    acc = float(err.split("accuracy ")[1].split()[0])
    assert acc == pytest.approx(np.mean([g == str(n) for g, n in zip(got, names)]), abs=1e-4)
    assert acc >= 0.8  # (it learned: the labels are not scrambled)
    for fmt in ("csv", "npy"):
        path = tmp_path / f"p.{fmt}"
        assert _predict(ckpt, data, capsys, "--out", str(path))[0] == 0
        if fmt == "csv":
            with open(path, newline="") as f:
                back = [r[0] for r in csv.reader(f)]
        else:
            back = [str(v) for v in np.load(path, allow_pickle=False)]
        assert back == got


def _saved_model(tmp_path, loss, n_out, task_data):
    X, y = task_data
    m = bpcore.MLP([3, 8, n_out], "tanh", dtype="float64", seed=0)
    tr = bpcore.Trainer(m, loss, optim.adam(1e-2))
    tr.fit(X, y, epochs=30, batch_size=16, verbose=0)
    return m, tr


def _predicted_by_command(tmp_path, capsys, loss, n_out, X, targets, cell):
    """Train on ``(X, targets)``, save with Trainer.save, run ``bpcore predict`` on X:
    the model and the command's output parsed with ``cell``."""
    m, tr = _saved_model(tmp_path, loss, n_out, (X, targets))
    ckpt = tmp_path / "m.safetensors"
    tr.save(ckpt)
    data = tmp_path / "x.csv"
    _write_csv(data, X)
    rc, out, err = _predict(ckpt, data, capsys)
    assert rc == 0, err
    return m, np.array([[cell(c) for c in row] for row in csv.reader(out.splitlines())])


def test_binary_cross_entropy_checkpoint_predicts_labels_not_logits(tmp_path, capsys):
    X, y = _blobs()
    m, got = _predicted_by_command(tmp_path, capsys, "binary_cross_entropy", 1, X,
                                   y[:, None].astype(float), int)
    np.testing.assert_array_equal(got, m.predict(X))
    assert set(got.ravel()) <= {0, 1}


def test_regressor_prints_its_values_exactly(tmp_path, capsys):
    X, _ = _blobs()
    t = X @ np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]])
    m, got = _predicted_by_command(tmp_path, capsys, "mse", 2, X, t, float)
    np.testing.assert_array_equal(got, m.predict(X))  # the shortest exact text: no loss


def test_model_only_regressor_gives_the_python_error_not_zeros(tmp_path, capsys):
    X, _ = _blobs()
    m, _ = _saved_model(tmp_path, "mse", 2, (X, X[:, :2]))
    ckpt = tmp_path / "m.safetensors"
    bpcore.save(ckpt, bpcore.MLP([3, 8, 2], "tanh", dtype="float64", params=m.params))
    data = tmp_path / "x.csv"
    _write_csv(data, X)
    rc, out, err = _predict(ckpt, data, capsys)
    assert rc == 1 and out == ""
    assert "does not know what it predicts" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rows_with_nan_or_inf_are_refused_with_their_numbers(tmp_path, capsys, bad):
    X, y = _blobs()
    data = tmp_path / "d.csv"
    _write_csv(data, X, list(y))
    ckpt = _train(tmp_path, data, capsys)
    X[[4, 17], 1] = bad
    _write_csv(data, X, list(y))
    rc, out, err = _predict(ckpt, data, capsys)
    assert rc == 1 and out == ""
    assert "rows [4, 17]" in err and "NaN or inf" in err


# ---- bpcore train's flags ----------------------------------------------------------------------
def test_seed_error_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--seed", "-1"])
    assert "argument --seed" in capsys.readouterr().err


def test_a_network_too_big_for_memory_is_refused_before_allocating(tmp_path, capsys):
    assert main(["train", "--hidden", "2000000000", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--hidden" in err and "GiB" in err and "MemoryError" not in err
    with pytest.raises(SystemExit):
        main(["train", "--hidden", "99999999999"])
    assert "argument --hidden" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--lr", "0.5"], ["--optimizer", "sgd"], ["--hidden", "4"],
                                  ["--activation", "tanh"], ["--dtype", "float64"]])
def test_resume_refuses_flags_it_would_ignore(tmp_path, capsys, flag):
    X, y = _blobs()
    data = tmp_path / "d.csv"
    _write_csv(data, X, list(y))
    ckpt = _train(tmp_path, data, capsys)
    before = ckpt.read_bytes()
    rc = main(["train", "--data", str(data), "--resume", str(ckpt), "--epochs", "1",
               "--out", str(tmp_path / "run"), "--quiet", *flag])
    err = capsys.readouterr().err
    assert rc == 1 and flag[0] in err and "cannot be applied to a resumed run" in err
    assert ckpt.read_bytes() == before


def test_an_empty_label_cell_is_no_class(tmp_path, capsys):
    X, y = _blobs()
    labels = [str(v) for v in y]
    labels[7] = ""
    data = tmp_path / "d.csv"
    _write_csv(data, X, labels)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert "label column is empty" in capsys.readouterr().err


def test_resume_keeps_the_checkpoints_float64_on_jax(tmp_path):
    """--dtype is refused with --resume, so the checkpoint's dtype must be the one used: a
    float64 run on JAX resumes in float64 (64-bit mode switched on for it), in a fresh
    process as a user runs it."""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    X, y = _blobs()
    data = tmp_path / "d.csv"
    _write_csv(data, X, list(y))
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    run = [sys.executable, "-m", "bpcore", "train", "--backend", "jax", "--data", str(data),
           "--epochs", "1", "--quiet", "--out", str(tmp_path / "r")]
    first = subprocess.run(run + ["--dtype", "float64"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    ckpt = tmp_path / "r" / "model.safetensors"
    again = subprocess.run(run + ["--resume", str(ckpt)], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "jax/float64" in again.stdout
    ck = bpcore.load_checkpoint(ckpt)
    assert ck.epoch == 2 and ck.config.dtype == "float64"
