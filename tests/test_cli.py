"""The bpcore command: the default training run, its outputs, predict, info, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bpcore
from bpcore import backends
from bpcore.cli import main
from bpcore.io.datasets import load_file, make_spirals, train_test_split


@pytest.mark.extended(cases=["jax"])
@pytest.mark.parametrize("backend_name", ["numpy", "jax"])
def test_default_train_reaches_95_percent_on_digits(tmp_path, capsys, backend_name):
    pytest.importorskip("sklearn")
    if backend_name not in backends.available():
        pytest.skip(backends.reasons().get(backend_name, backend_name))
    out = tmp_path / "run"
    assert main(["train", "--backend", backend_name, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    acc = float(printed.split("test accuracy ")[1].split(",")[0])
    assert acc >= 0.95, printed
    hist = json.loads((out / "history.json").read_text())
    assert hist["test"]["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = bpcore.load(out / "model.safetensors")
    assert model.sizes == [64, 128, 64, 10]


def test_train_on_files_resume_and_predict(tmp_path, capsys):
    X, y = make_spirals(60, 3, seed=1)
    npz = tmp_path / "d.npz"
    np.savez(npz, X=X, y=y + 5)  # arbitrary label values are mapped to classes and back
    csv = tmp_path / "d.csv"
    with open(csv, "w") as f:
        f.write("a,b,label\n")
        for row, label in zip(X, y):
            f.write(f"{row[0]},{row[1]},{label}\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--hidden", "32,32", "--activation", "tanh",
                 "--optimizer", "momentum", "--lr", "0.05", "--epochs", "5",
                 "--batch-size", "16", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    ck = bpcore.load_checkpoint(out / "model.safetensors")
    assert ck.epoch == 5 and ck.metadata["classes"] == [5, 6, 7]
    assert main(["train", "--data", str(npz), "--resume", str(out / "model.safetensors"),
                 "--epochs", "3", "--out", str(out), "--quiet"]) == 0
    assert bpcore.load_checkpoint(out / "model.safetensors").epoch == 8
    assert main(["train", "--data", str(csv), "--epochs", "2", "--out", str(tmp_path / "c"),
                 "--quiet", "--patience", "1"]) == 0
    capsys.readouterr()
    preds = tmp_path / "p.npy"
    assert main(["predict", str(out / "model.safetensors"), "--data", str(npz),
                 "--out", str(preds)]) == 0
    p = np.load(preds)
    assert p.shape == (180,) and set(np.unique(p)) <= {5, 6, 7}
    assert "accuracy" in capsys.readouterr().err


def test_info_lists_backends_and_blas(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in backends.available():
        assert name in out
    assert "cpu:" in out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "abc"], "--lr"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--hidden", "3,x"], "--hidden"),
    (["train", "--hidden", "0"], "--hidden"),
    (["train", "--activation", "rellu"], "--activation"),
    (["train", "--optimizer", "rmsprop"], "--optimizer"),
    (["train", "--dtype", "float16"], "--dtype"),
    (["train", "--backend", "nope", "--epochs", "1"], "unknown name 'nope'"),
    (["train", "--data", "/does/not/exist.npz"], "no file"),
    (["train", "--data", "pyproject.toml"], "expected a .npz"),
    (["train", "--resume", "/does/not/exist.safetensors"], "no checkpoint"),
    (["predict", "/does/not/exist.safetensors", "--data", "x.npz"], "no checkpoint"),
    (["predict"], "checkpoint"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_cli_errors_are_one_line_without_traceback(argv, needle):
    r = subprocess.run([sys.executable, "-m", "bpcore", *argv], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr


def test_file_loaders(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,0\n3,4,1\n")
    X, y = load_file(str(p))
    assert X.shape == (2, 2) and list(y) == [0, 1]
    p.write_text("y,f1,f2\n1,0.5,2\n0,1.5,3\n")
    X, y = load_file(str(p))
    np.testing.assert_array_equal(X, [[0.5, 2], [1.5, 3]])
    X, y = load_file(str(p), label_column="f2")
    assert X.shape == (2, 2) and list(y) == [2, 3]
    p.write_text("1,2\n3\n")
    with pytest.raises(bpcore.errors.ShapeError):
        load_file(str(p))
    np.savez(tmp_path / "bad.npz", X=np.ones((3, 2)))
    with pytest.raises(bpcore.errors.ShapeError, match="missing"):
        load_file(str(tmp_path / "bad.npz"))
    a, b, c, d = train_test_split(np.arange(10)[:, None], np.arange(10), 0.3, seed=0)
    assert len(a) == 7 and len(b) == 3 and sorted(np.concatenate([c, d])) == list(range(10))


def test_resume_of_a_checkpoint_not_written_by_the_cli(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    t = bpcore.Trainer(bpcore.MLP([64, 8, 10]), "softmax_cross_entropy", "adam")
    t.save(path)
    assert main(["train", "--resume", str(path), "--epochs", "1", "--quiet",
                 "--out", str(tmp_path)]) == 1
    assert "not written by `bpcore train`" in capsys.readouterr().err


# ---- what the command accepts is what its help says, and nothing trains on a wrong column --
def _csv(path, rows, header=None):
    lines = ([",".join(header)] if header else []) + [",".join(f"{v:g}" for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_label_column_out_of_range_is_an_error(tmp_path, capsys):
    X, y = make_spirals(20, 3, seed=1)
    table = np.column_stack([X, X, X[:, :1], y])  # 6 columns
    data = _csv(tmp_path / "d.csv", table)
    assert main(["train", "--data", str(data), "--label-column", "99", "--epochs", "1",
                 "--quiet", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "label column 99 does not exist" in err and "6 columns" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    X2, y2 = load_file(str(data), "-1")
    np.testing.assert_array_equal(y2, y)


@pytest.fixture(scope="module")
def spirals_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spirals")
    X, y = make_spirals(60, 3, seed=1)
    data = _csv(tmp / "train.csv", np.column_stack([X, y]))
    assert main(["train", "--data", str(data), "--epochs", "30", "--quiet", "--out",
                 str(tmp / "run")]) == 0
    return tmp / "run" / "model.safetensors", X, y


def test_predict_takes_features_only_or_features_and_labels(spirals_model, tmp_path, capsys):
    ckpt, X, y = spirals_model
    capsys.readouterr()
    feats = _csv(tmp_path / "f.csv", X)  # no header, no label: both columns are features
    assert main(["predict", str(ckpt), "--data", str(feats)]) == 0
    only = capsys.readouterr()
    pred = np.array([int(v) for v in only.out.split()])
    assert len(pred) == len(X) and "accuracy" not in only.err
    both = _csv(tmp_path / "fy.csv", np.column_stack([X, y]), header=["a", "b", "label"])
    assert main(["predict", str(ckpt), "--data", str(both)]) == 0
    out = capsys.readouterr()
    np.testing.assert_array_equal(np.array([int(v) for v in out.out.split()]), pred)
    assert "accuracy" in out.err
    np.savez(tmp_path / "x.npz", X=X)  # an .npz without y, as the help says
    assert main(["predict", str(ckpt), "--data", str(tmp_path / "x.npz")]) == 0
    np.testing.assert_array_equal(np.array([int(v) for v in capsys.readouterr().out.split()]),
                                  pred)


@pytest.mark.parametrize("width", [1, 4])
def test_predict_on_the_wrong_width_says_so(spirals_model, tmp_path, capsys, width):
    ckpt, X, _ = spirals_model
    data = _csv(tmp_path / "w.csv", np.ones((5, width)))
    capsys.readouterr()
    assert main(["predict", str(ckpt), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model takes 2 features" in err


def test_predict_applies_the_training_preprocessing_to_raw_digits(tmp_path, capsys):
    sk = pytest.importorskip("sklearn.datasets")
    assert main(["train", "--epochs", "15", "--quiet", "--out", str(tmp_path)]) == 0
    test_acc = float(capsys.readouterr().out.split("test accuracy ")[1].split(",")[0])
    ckpt = bpcore.load_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.preprocessing is not None  # saved with the model, usable from Python
    d = sk.load_digits()  # raw pixel values 0..16, exactly as anyone would load them
    np.savez(tmp_path / "raw.npz", X=d.data, y=d.target)
    assert main(["predict", str(tmp_path / "model.safetensors"), "--data",
                 str(tmp_path / "raw.npz"), "--out", str(tmp_path / "p.npy")]) == 0
    acc = float(capsys.readouterr().err.split("accuracy ")[1].split()[0])
    assert acc >= min(0.95, test_acc - 0.02), (acc, test_acc)
    logits = np.asarray(ckpt.model(ckpt.preprocess(d.data)))
    np.testing.assert_array_equal(logits.argmax(1), np.load(tmp_path / "p.npy"))


def test_patience_watches_the_validation_loss_and_says_when_it_stops(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "bpcore", "train", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert "validation loss (val_loss)" in " ".join(r.stdout.split())
    X, y = make_spirals(40, 3, seed=2)
    data = _csv(tmp_path / "d.csv", np.column_stack([X, y]))
    assert main(["train", "--data", str(data), "--epochs", "300", "--patience", "2",
                 "--lr", "0.05", "--quiet", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("early stopping: val_loss did not improve for 2 epochs") == 1
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    stopped = int(err.split("stopped after epoch ")[1].split()[0])
    best = int(err.split("kept epoch ")[1].split()[0])
    assert len(hist["epochs"]) == stopped == best + 2
    assert hist["val_loss"][best - 1] == min(hist["val_loss"])


def test_train_that_diverges_fails_and_writes_no_checkpoint(tmp_path, capsys):
    X, y = make_spirals(40, 3, seed=2)
    data = _csv(tmp_path / "d.csv", np.column_stack([X, y]))
    assert main(["train", "--data", str(data), "--lr", "1e6", "--epochs", "20", "--quiet",
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---- a CSV with a header is read by the training columns' names ------------------------------
@pytest.fixture(scope="module")
def named_model(tmp_path_factory):
    """A model trained on a CSV whose header names its columns (label first, not last)."""
    tmp = tmp_path_factory.mktemp("named")
    rng = np.random.default_rng(4)
    X = rng.standard_normal((240, 3))
    y = (X[:, 0] - 2 * X[:, 2] > 0).astype(int)  # the columns' order matters
    data = _csv(tmp / "train.csv", np.column_stack([y, X]), header=["kind", "u", "v", "w"])
    assert main(["train", "--data", str(data), "--label-column", "kind", "--epochs", "20",
                 "--quiet", "--out", str(tmp / "run")]) == 0
    return tmp / "run" / "model.safetensors", X, y


def _predictions(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    return [int(v) for v in out.out.split()], out.err


def test_predict_reads_a_headed_csv_by_column_name(named_model, tmp_path, capsys):
    """The same columns in another order give the same predictions (they gave the columns
    swapped, a silent wrong answer), with or without the label, which is found by its
    training name; a header-less file is read by position, as before."""
    ckpt, X, y = named_model
    meta = bpcore.load_checkpoint(str(ckpt)).metadata
    assert meta["feature_names"] == ["u", "v", "w"] and meta["label_name"] == "kind"
    want, err = _predictions(capsys, ["predict", str(ckpt), "--data",
                                      str(_csv(tmp_path / "a.csv", X, ["u", "v", "w"]))])
    assert "accuracy" not in err
    for name, cols, header in (("b", [2, 0, 1], ["w", "u", "v"]),
                               ("c", [1, 2, 0], ["v", "w", "u"])):
        got, err = _predictions(capsys, ["predict", str(ckpt), "--data", str(
            _csv(tmp_path / f"{name}.csv", np.column_stack([X[:, cols], y]), header + ["kind"]))])
        assert got == want and "accuracy" in err
    got, _ = _predictions(capsys, ["predict", str(ckpt), "--data",
                                   str(_csv(tmp_path / "p.csv", X))])  # no header: by position
    assert got == want
    # --label-column names the label; the file's other columns are then left unread
    extra = _csv(tmp_path / "e.csv", np.column_stack([X[:, ::-1], y, y]),
                 ["w", "v", "u", "truth", "id"])
    got, err = _predictions(capsys, ["predict", str(ckpt), "--data", str(extra),
                                     "--label-column", "truth"])
    assert got == want and "accuracy" in err


@pytest.mark.parametrize("header, needle", [
    (["u", "vv", "w", "kind"], "['v'] are missing"),
    (["u", "v", "w", "id"], "columns ['id'] besides the model's features"),
    (["u", "v", "w", "u"], "['u'] appear more than once"),
])
def test_predict_refuses_columns_it_cannot_match_by_name(named_model, tmp_path, capsys,
                                                         header, needle):
    ckpt, X, y = named_model
    data = _csv(tmp_path / "d.csv", np.column_stack([X, y]), header)
    capsys.readouterr()
    assert main(["predict", str(ckpt), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_resume_reads_the_data_by_the_checkpoints_names(named_model, tmp_path, capsys):
    ckpt, X, y = named_model
    data = _csv(tmp_path / "r.csv", np.column_stack([X[:, [2, 1, 0]], y]),
                ["w", "v", "u", "kind"])
    assert main(["train", "--resume", str(ckpt), "--data", str(data), "--epochs", "1",
                 "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert bpcore.load_checkpoint(str(tmp_path / "run" / "model.safetensors")).metadata[
        "feature_names"] == ["u", "v", "w"]
    capsys.readouterr()
    bare = _csv(tmp_path / "x.csv", X, ["w", "u", "v"])  # the features and no label
    assert main(["train", "--resume", str(ckpt), "--data", str(bare), "--epochs", "1",
                 "--quiet", "--out", str(tmp_path / "run2")]) == 1
    assert "no label column; training needs one" in capsys.readouterr().err


@pytest.mark.parametrize("names, label", [(5, "kind"), (["u", "u", "w"], "kind"),
                                          (["u", "v"], "kind"), ([1, 2, 3], "kind"),
                                          (["u", "v", "w"], 7)])
def test_a_checkpoints_malformed_column_names_are_refused(names, label):
    """Crafted metadata (a checkpoint is untrusted input): one clear error, never a guess."""
    from bpcore.cli.commands import _column_names

    with pytest.raises(ValueError, match="feature_names are malformed"):
        _column_names({"feature_names": names, "label_name": label}, 3)
    assert _column_names({}, 3) == (None, None)  # (a checkpoint from before: by position)


def test_a_byte_order_mark_is_no_part_of_the_data(named_model, tmp_path, capsys):
    """A CSV a spreadsheet saved with a UTF-8 byte-order mark reads as the same file without
    one: a header-less file kept its first row as a "header" (one row of data dropped), and
    a header's first name did not match. A file in another encoding is a clear error."""
    ckpt, X, y = named_model
    headed = _csv(tmp_path / "h.csv", np.column_stack([X, y]), ["u", "v", "w", "kind"])
    bare = _csv(tmp_path / "b.csv", X)
    want, _ = _predictions(capsys, ["predict", str(ckpt), "--data", str(headed)])
    for plain in (headed, bare):
        bom = tmp_path / ("bom-" + plain.name)
        bom.write_text(plain.read_text(), encoding="utf-8-sig")
        got, _ = _predictions(capsys, ["predict", str(ckpt), "--data", str(bom)])
        assert got == want
        Xb, _ = load_file(str(bom), n_features=3)
        Xp, _ = load_file(str(plain), n_features=3)
        np.testing.assert_array_equal(Xb, Xp)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(headed.read_bytes().replace(b"u,", b"\xe9,", 1))
    capsys.readouterr()
    assert main(["predict", str(ckpt), "--data", str(latin)]) == 1
    assert "is not UTF-8 text (byte 0xe9" in capsys.readouterr().err


def test_a_file_in_another_csv_dialect_is_read_or_named(named_model, tmp_path, capsys):
    """Cells quoted after a space (``"a", "b"``) read as plain ones; a file separated by
    ';' or tabs (one column to the csv reader) is an error that says so, for predict and
    for train (train took its one column as 301 classes and no features)."""
    ckpt, X, y = named_model
    plain = _csv(tmp_path / "p.csv", np.column_stack([X, y]), ["u", "v", "w", "kind"])
    want, _ = _predictions(capsys, ["predict", str(ckpt), "--data", str(plain)])
    lines = plain.read_text().splitlines()
    spaced = tmp_path / "s.csv"
    spaced.write_text("\n".join(", ".join(f'"{c}"' for c in ln.split(",")) for ln in lines))
    assert _predictions(capsys, ["predict", str(ckpt), "--data", str(spaced)])[0] == want
    for sep in (";", "\t"):
        other = tmp_path / "o.csv"
        other.write_text("\n".join(ln.replace(",", sep) for ln in lines) + "\n")
        for argv in (["predict", str(ckpt), "--data", str(other)],
                     ["train", "--data", str(other), "--epochs", "1", "--quiet", "--out",
                      str(tmp_path / "run")]):
            capsys.readouterr()
            assert main(argv) == 1
            assert f"seem separated by {sep!r}" in capsys.readouterr().err
