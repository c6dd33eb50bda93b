"""Re-point the `file:line` references in docs/derivation.md after code moved.

Each reference quotes the code it points at; this finds that code again (nearest match)
and rewrites the line number. Run from the repository root: python docs/refresh_line_refs.py
"""

import re
import sys

PATH = "docs/derivation.md"
PATTERN = r"`((?:bpcore|backends)/[\w/]+\.py):(\d+)` `([^`]+)`"


def fix(m: re.Match) -> str:
    path, line, code = m.group(1), int(m.group(2)), m.group(3)
    lines = open(path, encoding="utf-8").read().splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if code.strip() in text]
    if not hits:
        sys.exit(f"{path}: the quoted code {code!r} is gone; update {PATH} by hand")
    return f"`{path}:{min(hits, key=lambda h: abs(h - line))}` `{code}`"


text = open(PATH, encoding="utf-8").read()
new = re.sub(PATTERN, fix, text)  # all of it first: a reference gone stops before any write
open(PATH, "w", encoding="utf-8").write(new)
