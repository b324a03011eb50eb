"""Rows of a benchmark's results file (a JSON list): a rerun replaces the rows it measured."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def replace_rows(old: list[dict], rows: list[dict], key: Sequence[str]) -> list[dict]:
    """`old` without the rows `rows` measure again (same `key` fields), then `rows`."""
    new = {tuple(r[f] for f in key) for r in rows}
    return [r for r in old if tuple(r[f] for f in key) not in new] + rows


def merge_rows(path: Path, rows: list[dict], key: Sequence[str]) -> None:
    """Write `rows` into the JSON list at `path`, replacing earlier rows with the same `key`
    fields and keeping the rest, sorted by key."""
    old = json.loads(path.read_text()) if path.exists() else []
    merged = replace_rows(old, rows, key)
    path.write_text(json.dumps(sorted(merged, key=lambda r: tuple(r[f] for f in key)), indent=1) + "\n")
