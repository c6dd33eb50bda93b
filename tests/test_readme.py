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
