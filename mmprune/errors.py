"""User-facing errors. The CLI prints them as one paragraph and exits non-zero, never a traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class MMPruneError(Exception):
    """An error caused by user input or environment, explained in words."""


class RecipeError(MMPruneError):
    """A recipe that cannot be used: names the file, line and field path."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = []
        if file:
            where.append(str(file))
        if line:
            where.append(f"line {line}")
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class PluginError(MMPruneError):
    """A plugin that cannot be registered (bad class, duplicate name, failed import under --strict-plugins)."""


class ModelLoadError(MMPruneError):
    """A model reference that cannot be resolved to a loadable model."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean 'x'? Valid: a, b, c.' — the suffix every unknown-name error carries."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if not close and name:  # abbreviations such as 'val' for 'validation'
        close = [v for v in valid if v.startswith(name)][:1]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(valid) if len(valid) <= 20 else ", ".join(valid[:20]) + ", …"
    return f"{hint} Valid: {listing}." if valid else hint
