"""docs/derivation.md must point at lines that still hold the code it quotes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_line_reference_in_the_derivation_map_is_current():
    text = (ROOT / "docs" / "derivation.md").read_text(encoding="utf-8")
    refs = re.findall(r"`((?:bpcore|backends)/[\w/]+\.py):(\d+)` `([^`]+)`", text)
    assert len(refs) >= 15
    for path, line, code in refs:
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        assert code.strip() in lines[int(line) - 1], (
            f"{path}:{line} no longer holds {code!r}; run python docs/refresh_line_refs.py")


def test_the_docs_stand_on_their_own():
    """No page points outside the repository (the project's shared folder is not shipped)."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "backprop-derivation.txt" not in text, page
