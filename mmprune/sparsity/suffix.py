"""Suffix recomputation for block probes (ecoflap.md §3.3): a probe on block g re-runs only what
g can change.

One unperturbed loss evaluation per calibration batch records the output of every call of every
block. While block g is probed, the blocks g cannot influence (the earlier blocks of its tower and
every tower that does not read its tower's outputs) return their recorded outputs instead of
running. Their inputs do not depend on g, so the loss is the one the full forward gives, bit for
bit; only the work is smaller (on a dual encoder, a probe skips the whole other tower).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _detached(obj: Any, clone: bool) -> Any:
    if torch.is_tensor(obj):
        t = obj.detach()
        return t.clone() if clone else t
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):       # namedtuple
        return type(obj)(*(_detached(o, clone) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o, clone) for o in obj)
    if isinstance(obj, dict):
        out = obj.copy()       # keeps ModelOutput subclasses
        for k, v in obj.items():
            out[k] = _detached(v, clone)
        return out
    return obj


class BlockOutputs:
    """Recorded outputs of the blocks at `paths`, per calibration batch, in call order."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.modules = {p: model.get_submodule(p) for p in paths}
        self.calls: dict[Hashable, dict[str, list[Any]]] = {}

    def record(self, key: Hashable, run: Callable[[], Any]) -> None:
        """Run `run()` (the unperturbed loss of batch `key`) and keep every block call's output."""
        calls: dict[str, list[Any]] = {p: [] for p in self.modules}
        handles = [m.register_forward_hook(
            lambda mod, args, out, p=p: calls[p].append(_detached(out, clone=True)))
            for p, m in self.modules.items()]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
        self.calls[key] = calls

    @contextmanager
    def replaying(self, key: Hashable, skip: Iterable[str]) -> Iterator[None]:
        """Inside, the blocks in `skip` return batch `key`'s recorded outputs without running.
        A block called more or fewer times than when recorded is an error: the control flow
        changed, and the replay would not be exact."""
        skip = [p for p in skip if p in self.modules]
        queues = {p: iter(self.calls[key][p]) for p in skip}
        used = dict.fromkeys(skip, 0)

        def replay(p: str):
            def forward(*args, **kwargs):
                try:
                    out = next(queues[p])
                except StopIteration:
                    raise RuntimeError(f"suffix recomputation: {p} was called more often than "
                                       "when its outputs were recorded") from None
                used[p] += 1
                return _detached(out, clone=True)   # callers may modify what they get in place
            return forward

        own = {p: vars(self.modules[p]).get("forward") for p in skip}   # instance-level forwards
        for p in skip:
            self.modules[p].forward = replay(p)
        try:
            yield
        finally:
            for p in skip:
                if own[p] is None:
                    del self.modules[p].forward     # back to the class's forward
                else:
                    self.modules[p].forward = own[p]
        short = [p for p in skip if used[p] != len(self.calls[key][p])]
        if short:
            raise RuntimeError(f"suffix recomputation: {short[0]} was called fewer times than "
                               "when its outputs were recorded")


def skipped_blocks(blocks: Sequence[tuple[str, str]], downstream: Mapping[str, set[str]]
                   ) -> dict[str, list[str]]:
    """Block path -> the blocks a probe on it cannot influence: the earlier blocks of its own
    tower and every block of a tower that is not downstream of it. `blocks` are (tower, path) in
    forward order within each tower; `downstream[t]` are the towers that read tower t's outputs,
    directly or not."""
    out = {}
    for i, (tower, path) in enumerate(blocks):
        out[path] = [q for j, (t, q) in enumerate(blocks)
                     if (t == tower and j < i) or (t != tower and t not in downstream[tower])]
    return out
