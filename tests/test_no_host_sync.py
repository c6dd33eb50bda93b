"""The training step never waits on the host.

On a CUDA device every Python scalar turned into a tensor inside the step is a host-to-device
copy that blocks the CPU until the GPU catches up, so a step that does it cannot queue ahead.
``array_api_compat``'s torch ``maximum``/``minimum`` do exactly that with a scalar argument.

The CPU check below runs anywhere: on the torch backend (CPU here) it counts every call that
makes a tensor from host data (``torch.asarray``, ``torch.tensor``, ...) during steady-state
steps, with every activation, loss and optimizer variant, and requires none. It covers both
executors that run on CUDA: the generic step and the buffered one
(:mod:`bpcore.training.buffered`). On a CUDA machine the GPU check repeats the steps under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call.
"""

from __future__ import annotations

import numpy as np
import pytest

import bpcore
from bpcore import optim
from bpcore.errors import BackendUnavailableError
from bpcore.training.buffered import BufferedStep

from .conftest import skip_or_fail

# Each constructor that can turn host data (a Python scalar, a list, a NumPy array) into a
# tensor. Anything the step legitimately creates on the device (zeros, arange) is not here.
HOST_TO_TENSOR = ("asarray", "tensor", "as_tensor", "scalar_tensor", "from_numpy")


def _torch_backend():
    try:
        return bpcore.backends.get("torch")
    except BackendUnavailableError as e:
        skip_or_fail(str(e))


OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.01),
    "nesterov": lambda: optim.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda: optim.adam(1e-3),
    "adamw-cosine": lambda: optim.adamw(optim.cosine_decay(1e-3, 10)),
    "sgd-step-decay": lambda: optim.sgd(optim.step_decay(0.1, 2)),
}

CONFIGS = (
    [(act, "softmax_cross_entropy", "adam", None) for act in sorted(bpcore.ACTIVATIONS)
     if act != "softmax"]
    + [("relu", loss, "sgd", None) for loss in ("mse", "binary_cross_entropy")]
    + [("relu", "softmax_cross_entropy", opt, clip) for opt in OPTIMIZERS
       for clip in (None, 1.0)]
)


EXECUTORS = ("generic", "buffered")


def _trainer(be, act, loss, opt, clip, executor):
    # The generic and the buffered step: the two that run on CUDA. (The in-place step, used
    # where the host reads values for free, reads host scalars by design.)
    model = bpcore.MLP([5, 7, 3], activation=act, backend=be, dtype="float32", seed=0)
    trainer = bpcore.Trainer(model, loss, OPTIMIZERS[opt](), clip_norm=clip,
                             inplace=None if executor == "buffered" else False)
    if executor == "buffered":
        if type(trainer._inplace) is not BufferedStep:  # (on the CPU: the in-place step)
            trainer._inplace = BufferedStep(trainer)
            # ... with the operations as on a CUDA device, where the host reads no tensor
            # (on the CPU's tensors they run the NumPy backend's one-pass loss kernels on
            # the tensors' memory, by design: host scalars)
            ops = trainer._inplace.ops = type(be.inplace_ops)(be.inplace_ops.torch)
            ops.host_reads = False
    return trainer


def _batch(be, loss, rng):
    x = be.asarray(rng.standard_normal((8, 5)).astype(np.float32))
    if loss == "softmax_cross_entropy":
        y = be.asarray(rng.integers(0, 3, 8))
    else:
        y = be.asarray(rng.uniform(0, 1, (8, 3)).astype(np.float32))
    return x, y


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("act,loss,opt,clip", CONFIGS)
def test_torch_step_makes_no_tensor_from_host_data(monkeypatch, act, loss, opt, clip,
                                                   executor):
    torch = pytest.importorskip("torch")
    be = _torch_backend()
    rng = np.random.default_rng(0)
    trainer = _trainer(be, act, loss, opt, clip, executor)
    x, y = _batch(be, loss, rng)
    xb, T = trainer.prepare_batch(x, y)
    for _ in range(2):  # warm-up: whatever is built once is allowed
        trainer.step_prepared(xb, T)

    calls: list[str] = []
    for name in HOST_TO_TENSOR:
        real = getattr(torch, name)

        def counting(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(torch, name, counting)
    for _ in range(3):
        trainer.step_prepared(xb, T)
    assert calls == [], f"the step made tensors from host data: {calls}"
    assert bool(torch.isfinite(trainer.step_prepared(xb, T)[0]))


def test_the_check_sees_a_host_scalar(monkeypatch):
    """The counter above is not blind: array_api_compat's maximum with a scalar trips it."""
    torch = pytest.importorskip("torch")
    be = _torch_backend()
    calls = []
    real = torch.asarray
    monkeypatch.setattr(torch, "asarray", lambda *a, **k: calls.append(1) or real(*a, **k))
    be.xp.maximum(be.asarray(np.ones(3, np.float32)), 0.0)
    assert calls, "array_api_compat no longer converts the scalar; the check needs a new probe"


def _cuda_torch_backend():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        skip_or_fail("no CUDA device: the sync-debug check needs a GPU")
    be = _torch_backend()
    if be.device.type != "cuda":
        skip_or_fail(f"the torch backend is on {be.device}, not CUDA")
    return torch, be


@pytest.mark.gpu
@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("act,loss,opt,clip", CONFIGS)
def test_cuda_torch_step_never_synchronises(act, loss, opt, clip, executor):
    torch, be = _cuda_torch_backend()
    rng = np.random.default_rng(0)
    trainer = _trainer(be, act, loss, opt, clip, executor)
    if executor == "buffered":  # (the default on CUDA: no forcing needed)
        assert type(trainer._inplace) is BufferedStep
    x, y = _batch(be, loss, rng)
    xb, T = trainer.prepare_batch(x, y)
    for _ in range(2):
        trainer.step_prepared(xb, T)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step_prepared(xb, T)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(trainer.step_prepared(xb, T)[0]))


@pytest.mark.gpu
def test_cuda_sync_debug_mode_catches_a_sync():
    """The GPU check is not blind: reading a value back does raise under it."""
    torch, be = _cuda_torch_backend()
    t = be.asarray(np.ones(3, np.float32))
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            float(t.sum())
    finally:
        torch.cuda.set_sync_debug_mode("default")
