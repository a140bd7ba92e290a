"""Benchmark reports: each command owns one marked section of docs/benchmarks.md and rewrites only that."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery figure here was printed by the command next to it.\n"


def replace_section(path: Path, name: str, block: str) -> None:
    """Replace `<!-- bench:name -->...<!-- /bench:name -->` in `path` with `block`, or append it."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
