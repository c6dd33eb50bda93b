"""docs/derivation.md must point at lines that still hold the code it quotes."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_line_reference_in_the_derivation_map_is_current():
    text = open(os.path.join(ROOT, "docs", "derivation.md"), encoding="utf-8").read()
    refs = re.findall(r"`((?:bpcore|backends)/[\w/]+\.py):(\d+)` `([^`]+)`", text)
    assert len(refs) >= 15
    for path, line, code in refs:
        lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
        assert code.strip() in lines[int(line) - 1], (
            f"{path}:{line} no longer holds {code!r}; run python docs/refresh_line_refs.py")
