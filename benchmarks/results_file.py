"""Rows of a benchmark's results file (a JSON list): a rerun replaces the rows it measured."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def merge_rows(path: Path, rows: list[dict], key: Sequence[str]) -> None:
    """Write `rows` into the JSON list at `path`, replacing earlier rows with the same `key`
    fields and keeping the rest, sorted by key."""
    def k(r: dict) -> tuple:
        return tuple(r[f] for f in key)

    old = json.loads(path.read_text()) if path.exists() else []
    new = {k(r) for r in rows}
    merged = [r for r in old if k(r) not in new] + rows
    path.write_text(json.dumps(sorted(merged, key=k), indent=1) + "\n")
