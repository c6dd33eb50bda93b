"""A Ctrl-C at any point of a step leaves the state of a whole number of steps.

A thread sends SIGINT to the main thread at a random moment while it trains; Python's default
handler raises ``KeyboardInterrupt`` wherever the main thread is. Afterwards the trainer's
state (parameters, optimizer state, step count) must equal, bit for bit, that of an
uninterrupted run after ``trainer.steps`` steps, and training must go on from there. Without
the deferral of ``bpcore.training.interrupts`` the in-place steps fail this (NumPy: half the updates
applied, or the update applied without the step counted).
"""

from __future__ import annotations

import gc
import random
import signal
import threading
import time

import numpy as np
import pytest

import bpcore
from bpcore._array import nested_leaves

from .conftest import sigint_not_ignored

BACKENDS = ["numpy", "torch"]
OPTIMIZERS = {
    "momentum": lambda: bpcore.optim.sgd(0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda: bpcore.optim.adam(1e-3),
}
SIZES = (32, 256, 256, 10)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "torch":
        pytest.importorskip("torch")
    gc.collect()  # (Trainers of earlier tests hold bpcore's handler while they live)
    with sigint_not_ignored(on_restore=gc.collect):
        if not _default_or_held_default(signal.getsignal(signal.SIGINT)):
            pytest.skip("SIGINT has another handler in this process")
        yield request.param


def _default_or_held_default(handler) -> bool:
    """Python's default SIGINT handler, or bpcore's held handler passing signals to it."""
    from bpcore.training.interrupts import _DEFERRAL

    return handler is signal.default_int_handler or (
        getattr(handler, "func", None) == _DEFERRAL.held and
        handler.args == (signal.default_int_handler,))


def _data(n_batches: int = 8, rows: int = 64):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_batches, rows, SIZES[0]))
    y = rng.integers(0, SIZES[-1], size=(n_batches, rows))
    return X, y


def _trainer(backend: str, opt: str) -> bpcore.Trainer:
    model = bpcore.MLP(SIZES, backend=backend, dtype="float64", seed=1)
    return bpcore.Trainer(model, "softmax_cross_entropy", OPTIMIZERS[opt]())


def _snapshot(trainer: bpcore.Trainer) -> list[np.ndarray]:
    be, st = trainer.model.backend, trainer.state
    return [np.array(be.to_numpy(a), copy=True)
            for a in nested_leaves((st.params, st.opt_state, st.step, st.epoch))]


class _Sender:
    """Sends one SIGINT to the main thread, a random time after each :meth:`arm`."""

    def __init__(self, max_delay: float, seed: int):
        self.max_delay, self.rng = max_delay, random.Random(seed)
        self.armed, self.sent, self.stop = threading.Event(), threading.Event(), False
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def arm(self) -> None:
        self.sent.clear()
        self.armed.set()

    def wait_for_it(self) -> None:
        """Return only by the KeyboardInterrupt of the signal this round sends."""
        self.sent.wait()
        while True:
            time.sleep(0.01)

    def _run(self) -> None:
        while True:
            self.armed.wait()
            self.armed.clear()
            if self.stop:
                return
            time.sleep(self.rng.uniform(0, self.max_delay))
            signal.pthread_kill(self.main, signal.SIGINT)
            self.sent.set()

    def close(self) -> None:
        self.stop = True
        self.armed.set()
        self.thread.join()


def _step_time(backend: str, opt: str, X, y) -> float:
    t = _trainer(backend, opt)
    t.step(X[0], y[0])
    t0 = time.perf_counter()
    for k in range(5):
        t.step(X[k % len(X)], y[k % len(y)])
    return (time.perf_counter() - t0) / 5


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_ctrl_c_during_steps_leaves_whole_steps(backend, opt):
    X, y = _data()
    M = X.shape[0]
    trainer, reference = _trainer(backend, opt), _trainer(backend, opt)
    assert trainer.inplace  # the executor that writes buffer after buffer
    sender = _Sender(max_delay=3 * _step_time(backend, opt, X, y), seed=hash(opt) % 1000)
    rounds = 60
    try:
        for _ in range(rounds):
            try:
                sender.arm()
                while True:  # step until the signal comes, wherever it lands
                    k = trainer.steps
                    trainer.step(X[k % M], y[k % M])
            except KeyboardInterrupt:
                pass
            done = trainer.steps
            while reference.steps < done:
                k = reference.steps
                reference.step(X[k % M], y[k % M])
            got, want = _snapshot(trainer), _snapshot(reference)
            for i, (a, b) in enumerate(zip(got, want)):
                assert np.array_equal(a, b), (
                    f"after an interrupt at step {done}: leaf {i} is not the state of "
                    f"{done} whole steps (max diff {np.max(np.abs(a - b))})")
    finally:
        sender.close()
    # (How many land inside a step depends on the machine's speed, so it is not counted:
    # that a SIGINT inside a commit is held back is proved deterministically by
    # test_a_handler_of_the_users_own_is_called_after_the_step.)


def test_ctrl_c_during_fit_then_fit_again_equals_one_fit(backend):
    """``fit`` interrupted again and again, and called again each time, ends where one
    uninterrupted ``fit`` ends: bit for bit (each step whole, the epoch position counted)."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((640, SIZES[0]))
    y = rng.integers(0, SIZES[-1], size=640)
    epochs, kw = 3, dict(batch_size=32, seed=5, verbose=0)
    reference = _trainer(backend, "adam")
    reference.fit(X, y, epochs=epochs, **kw)
    trainer = _trainer(backend, "adam")
    per_epoch = _step_time(backend, "adam", X[None, :32], y[None, :32]) * 20
    sender = _Sender(max_delay=per_epoch, seed=7)
    interrupts = 0
    try:
        while trainer.epoch < epochs and interrupts < 30:
            try:
                sender.arm()
                if trainer.epoch < epochs:
                    trainer.fit(X, y, epochs=epochs - trainer.epoch, **kw)
                sender.wait_for_it()  # (the signal lands here when fit was faster)
            except KeyboardInterrupt:
                interrupts += 1
    finally:
        sender.close()
    if trainer.epoch < epochs:  # (a slow machine: finish without interrupts)
        trainer.fit(X, y, epochs=epochs - trainer.epoch, **kw)
    for i, (a, b) in enumerate(zip(_snapshot(trainer), _snapshot(reference))):
        assert np.array_equal(a, b), f"leaf {i} differs from the uninterrupted fit"


@pytest.mark.extended(cases=["torch-sgd"])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_ctrl_c_during_an_estimators_fit_keeps_whole_steps(backend, solver, monkeypatch):
    """scikit-learn's estimators catch a KeyboardInterrupt in ``fit`` and keep the model
    they stopped at ("Training interrupted by user."). On the in-place executors that model
    must be that of a whole number of steps: bit for bit the weights of an uninterrupted fit
    after as many steps as the optimizer counted (Adam's ``t``; SGD: the weights of some step)."""
    import warnings

    from sklearn.datasets import make_classification

    from bpcore.sklearn import MLPClassifier
    from bpcore.training.buffered import BufferedStep

    be = bpcore.backends.get(backend)
    X, y = make_classification(240, 12, n_informative=6, n_classes=3, random_state=0)
    kw = dict(hidden_layer_sizes=(48,), solver=solver, batch_size=24, max_iter=40, tol=0,
              n_iter_no_change=10**6, momentum=0.9, random_state=0, backend=backend,
              dtype="float64")
    snaps = []  # the weights after 0, 1, 2, ... steps of the uninterrupted fit
    real = BufferedStep.step

    def recording(self, state, x, T):
        if not snaps:
            snaps.append(_weights(be, state.params))
        out = real(self, state, x, T)
        snaps.append(_weights(be, out[0].params))
        return out

    monkeypatch.setattr(BufferedStep, "step", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        MLPClassifier(**kw).fit(X, y)
        fit_s = time.perf_counter() - t0
    monkeypatch.setattr(BufferedStep, "step", real)
    assert len(snaps) == 40 * 10 + 1
    sender = _Sender(max_delay=fit_s, seed=11)
    landed = 0
    try:
        for _ in range(25):
            clf = MLPClassifier(**kw)
            try:
                sender.arm()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    clf.fit(X, y)
                if not any("interrupted" in str(c.message) for c in caught):
                    sender.wait_for_it()  # (the signal lands here when fit was faster)
            except KeyboardInterrupt:
                pass
            if not hasattr(clf, "coefs_"):  # (it landed before the first step: no model)
                continue
            landed += 1
            got = [np.asarray(a) for a in clf.coefs_ + clf.intercepts_]
            if solver == "adam":
                want = snaps[clf._optimizer.t]
                assert all(np.array_equal(a, b) for a, b in zip(got, want)), (
                    f"interrupted after {clf._optimizer.t} Adam steps: the weights are not "
                    "those of as many whole steps")
            else:
                assert any(all(np.array_equal(a, b) for a, b in zip(got, want))
                           for want in snaps), "the weights are not those of any whole step"
    finally:
        sender.close()
    assert landed


def _weights(be, params):
    return ([np.array(be.to_numpy(W).T, copy=True) for W, _ in params] +
            [np.array(be.to_numpy(b), copy=True) for _, b in params])


def test_a_handler_of_the_users_own_is_called_after_the_step():
    """A SIGINT handler of the user's own runs once, after the commit; between steps every
    SIGINT reaches it at once; it is back in place when the last Trainer is gone."""
    from bpcore.training import interrupts

    calls = []

    def handler(signum, frame):
        calls.append(signum)

    gc.collect()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        token = interrupts.begin()  # (no Trainer yet: the commit installs its own)
        signal.raise_signal(signal.SIGINT)
        for _ in range(3):  # (Python runs a handler at the next bytecode boundary)
            pass
        assert calls == []  # held back inside the commit
        interrupts.end(token)
        assert calls == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is handler
        trainer = _trainer("numpy", "adam")
        X, y = _data(1)
        trainer.step(X[0], y[0])  # from now on the trainer holds bpcore's handler
        assert signal.getsignal(signal.SIGINT) is not handler
        signal.raise_signal(signal.SIGINT)  # between steps: passed straight on
        assert calls == [signal.SIGINT] * 2
        token = interrupts.begin()
        signal.raise_signal(signal.SIGINT)
        for _ in range(3):
            pass
        assert calls == [signal.SIGINT] * 2  # held inside a commit
        interrupts.end(token)
        assert calls == [signal.SIGINT] * 3
        del trainer
        gc.collect()
        assert signal.getsignal(signal.SIGINT) is handler  # put back with the last trainer
    finally:
        signal.signal(signal.SIGINT, previous)


def test_steps_in_another_thread_install_nothing():
    gc.collect()
    trainer = _trainer("numpy", "adam")
    X, y = _data(1)
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def work():
        trainer.step(X[0], y[0])
        seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [before] and trainer.steps == 1


def test_fit_stopped_after_an_epochs_last_batch_ends_that_epoch_and_goes_on():
    """An interrupt after an epoch's last step but before the epoch was ended: the next
    ``fit`` ends it (it counts as one of the epochs asked for) and runs the rest, as one
    uninterrupted ``fit`` would have."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((96, SIZES[0]))
    y = rng.integers(0, SIZES[-1], size=96)
    kw = dict(batch_size=32, seed=1, verbose=0)
    reference = _trainer("numpy", "adam")
    reference.fit(X, y, epochs=3, **kw)
    trainer = _trainer("numpy", "adam")
    check, calls = trainer.check, []

    def interrupted_check():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        check()

    trainer.check = interrupted_check
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=3, **kw)
    assert (trainer.epoch, trainer.epoch_batch) == (1, 3)
    history = trainer.fit(X, y, epochs=3 - trainer.epoch, **kw)
    assert trainer.epoch == 3 and history.epochs == [3]
    for i, (a, b) in enumerate(zip(_snapshot(trainer), _snapshot(reference))):
        assert np.array_equal(a, b), f"leaf {i} differs from the uninterrupted fit"
