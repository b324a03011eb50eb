"""Rows of a benchmark's results file (a JSON list): a rerun replaces the rows it measured."""
from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path

#: the MiniVL generator the data and zoo models come from (BENCHMARKS.md, "Data versions"). Bump
#: it with every change to mmprune/data/minivl that changes the data: rows measured on different
#: generators are kept apart, not replaced.
MINIVL_GENERATOR = 2
GENERATOR_FIELD = "minivl_generator"


def replace_rows(old: list[dict], rows: list[dict], key: Sequence[str]) -> list[dict]:
    """`old` without the rows `rows` measure again (same `key` fields), then `rows`."""
    new = {tuple(r[f] for f in key) for r in rows}
    return [r for r in old if tuple(r[f] for f in key) not in new] + rows


def merge_rows(path: Path, rows: list[dict], key: Sequence[str], defaults: dict | None = None) -> None:
    """Write `rows`, stamped with the current MiniVL generator, into the JSON list at `path`,
    replacing earlier rows with the same `key` fields and generator and keeping the rest,
    sorted by key. Rows written before the stamp existed are generator 1's; `defaults` fills
    key fields that older rows lack."""
    old = json.loads(path.read_text()) if path.exists() else []
    old = [{GENERATOR_FIELD: 1, **(defaults or {}), **r} for r in old]
    rows = [{**r, GENERATOR_FIELD: MINIVL_GENERATOR} for r in rows]
    key = (GENERATOR_FIELD, *key)
    merged = replace_rows(old, rows, key)
    path.write_text(json.dumps(sorted(merged, key=lambda r: tuple(r[f] for f in key)), indent=1) + "\n")


def write_timings(path: Path, rows: list[dict], **meta) -> None:
    """Write a timing benchmark's `rows` (each run rewrites the file), with the machine and torch
    version they were measured on and `meta`."""
    import torch

    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **meta}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
