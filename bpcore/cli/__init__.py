"""The ``bpcore`` command line: ``train``, ``predict``, ``info`` and ``bench`` (parsing and
dispatch; ``train`` and ``predict`` are in :mod:`bpcore.cli.commands`).

``bpcore train`` with no arguments trains a small MLP on a built-in dataset (scikit-learn's
8×8 digits, or synthetic spirals without scikit-learn), shows progress, prints the test
accuracy and time, and writes a checkpoint, the history and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


from ..errors import BpcoreError

DEFAULT_OUT = "bpcore-run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(convert: Any, what: str) -> Any:
    """An argparse type: ``convert(text)``, which must be a finite number > 0."""
    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not v > 0 or v == float("inf"):  # (NaN is not > 0)
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return v
    return parse


_positive_int, _positive_float = _positive(int, "integer"), _positive(float, "number")


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**63-1, got "
                                         f"{text!r}")
    return v


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 256,256, "
                                         f"got {text!r}")
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected positive widths like 256,256, got {text!r}")
    if any(s > 2 ** 31 for s in sizes):
        raise argparse.ArgumentTypeError(f"a width above 2**31 is more than any machine holds, "
                                         f"got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from .. import ACTIVATIONS, OPTIMIZERS, __version__

    p = _Parser(prog="bpcore", description="Hand-written backprop MLPs on NumPy/JAX/PyTorch/CuPy.")
    p.add_argument("--version", action="version", version=f"bpcore {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train an MLP (default: the built-in digits dataset)")
    t.add_argument("--backend", default="numpy", help="numpy, jax, torch, cupy, ... "
                   "(see `bpcore info`; default numpy)")
    # (The model's and optimizer's settings default to None, filled in by `train`: with
    # --resume they come from the checkpoint, and one given anyway is refused, not ignored.)
    t.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help="default float32")
    t.add_argument("--hidden", type=_hidden, default=None,
                   help="widths, e.g. 256,256 (default 128,64)")
    t.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS),
                   help="default relu")
    t.add_argument("--optimizer", default=None, choices=sorted(OPTIMIZERS),
                   help="default adam")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default 1e-3 for adam/adamw, 0.05 for sgd/momentum)")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--seed", type=_seed, default=0)
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
    from .commands import cmd_predict, cmd_train

    try:
        return {"train": cmd_train, "predict": cmd_predict, "info": cmd_info,
                "bench": cmd_bench}[args.command](args)
    except (BpcoreError, OSError, ValueError, ImportError) as e:
        print(f"bpcore {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bpcore {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_info(args) -> int:
    from .machine import machine_info

    info = machine_info()
    print(f"bpcore {info['bpcore']} on Python {info['python']}, {info['platform']}")
    print(f"cpu: {info['cpu']} ({info['cores']} cores)")
    for name, d in info["backends"].items():
        kernels = f"  in-place kernels {d['kernels']}" if "kernels" in d else ""
        print(f"  {name:<17} available  {d['version']:<14} device {d['device']}{kernels}")
    for name, why in info["unavailable"].items():
        print(f"  {name:<17} unavailable: {why}")
    if isinstance(info["blas"], list):
        for d in info["blas"]:
            print(f"blas: {d['internal_api']} {d['version']} threads={d['num_threads']} "
                  f"arch={d['architecture']}")
    else:
        print(f"blas: {info['blas']}")
    print(f"numba: {info['numba']}")
    for k, v in info["env"].items():
        print(f"env: {k}={v}")
    return 0


def cmd_bench(args) -> int:
    from ..benchmarks.__main__ import main as bench_main

    return bench_main(args.args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
