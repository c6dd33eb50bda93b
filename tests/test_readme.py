"""The README's example, as printed, runs on every backend it names (tested in a fresh
process, with no global switch such as JAX's 64-bit mode turned on)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bpcore import backends

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _example() -> str:
    section = README.split("## Ten lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _named_backends(code: str) -> list[str]:
    line = next(ln for ln in code.splitlines() if "backend=" in ln)
    return re.findall(r'"(\w+)"', line.split("backend=", 1)[1])


def test_the_example_names_the_backends():
    assert _named_backends(_example()) == ["numpy", "jax", "torch", "cupy"]


@pytest.mark.parametrize("name", ["numpy", "jax", "torch", "cupy"])
def test_the_example_runs_as_printed(name):
    if name not in backends.available():
        pytest.skip(backends.reasons().get(name, name))
    code = _example().replace('backend="numpy"', f'backend="{name}"', 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "BPCORE_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    acc, check = r.stdout.strip().split(" ", 1)
    assert float(acc) > 0.9 and check.startswith("gradcheck passed"), r.stdout


def test_the_example_runs_from_the_repository_over_a_plain_install():
    """After ``pip install ".[train]"`` (not editable), Python started in the repository
    imports this folder's ``bpcore/``, whose ``backends/`` an install maps into the package:
    ``import bpcore`` there failed with a circular-import error. Simulated without the
    editable install's import hook: ``-S`` (no .pth files), the checkout first on the path,
    then the environment's packages."""
    import sysconfig

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "BPCORE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    r = subprocess.run([sys.executable, "-S", "-c", _example()], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split(" ", 1)[1].startswith("gradcheck passed"), r.stdout


def _dropin_blocks() -> tuple[str, str]:
    section = README.split("## scikit-learn drop-in", 1)[1].split("\n## ", 1)[0]
    ours, theirs = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    return ours, theirs


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "BPCORE_"))}
    r = subprocess.run([sys.executable, "-W", "ignore::UserWarning", "-c", code],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_sklearn_dropin_is_five_lines_and_one_import_apart():
    ours, theirs = _dropin_blocks()
    assert len(ours.strip().splitlines()) == len(theirs.strip().splitlines()) == 5
    differ = [(a, b) for a, b in zip(ours.splitlines(), theirs.splitlines()) if a != b]
    assert len(differ) == 2  # the import, and backend= / dtype= on the constructor
    assert "bpcore.sklearn" in differ[0][0] and 'backend="jax"' in differ[1][0]


@pytest.mark.extended(cases=["torch"])
@pytest.mark.parametrize("name", ["numpy", "jax", "torch", "cupy"])
def test_the_sklearn_dropin_runs_and_scores_as_sklearn(name):
    """The drop-in, as printed, on each backend, scores within one point of the scikit-learn
    code it replaces."""
    pytest.importorskip("sklearn")
    if name not in backends.available():
        pytest.skip(backends.reasons().get(name, name))
    ours, theirs = _dropin_blocks()
    code = ours.replace('backend="jax"', f'backend="{name}"', 1)
    ref = float(_run(f"import warnings; warnings.simplefilter('ignore')\n{theirs}"))
    got = float(_run(f"import warnings; warnings.simplefilter('ignore')\n{code}"))
    assert ref > 0.85 and abs(got - ref) <= 0.01, (got, ref)
