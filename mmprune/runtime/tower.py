"""`ManagedTower`: runs one tower's blocks with soft masks, CIT scores and token dropping.

Per block (comp.md §3.3): explicit attention (the map is computed once and used for both the
output and the scores), head masks scale each head's output, CIT scores, CIP statistics,
token dropping, then the MLP with channel masks. Each example keeps its own tokens; a batch is
padded to its longest example and padded keys are masked (`pad_mask`), so results do not depend
on what else is in the batch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions as TowerOutput,
)

from mmprune.runtime import tokens as T
from mmprune.runtime.blocks import ManagedTowerSpec, TokenMarks


@dataclass
class SiteControl:
    """Token dropping at one block: threshold θ, floor and optional merging of what is dropped."""

    theta: float = 0.0
    min_keep_frac: float = 0.05
    merge: bool = False
    #: what ranks the candidates: 'attention', the attention they receive (CIT); 'distinct',
    #: how unlike the image's other tokens they are, measured once at the tower's first
    #: dropping site (against every token) and carried to the later sites
    score: str = "attention"


@dataclass
class BlockControl:
    """What the runtime applies to one block. Masks are per current unit; None means all ones."""

    head_mask: torch.Tensor | None = None
    mlp_mask: torch.Tensor | None = None
    cross_mask: torch.Tensor | None = None
    site: SiteControl | None = None


class Observer(Protocol):
    """Receives what CIM needs as the forward runs (see mmprune.comp.cim)."""

    def attention(self, tower: str, layer: int, context: torch.Tensor, s: torch.Tensor,
                  valid: torch.Tensor, global_: torch.Tensor) -> None: ...

    def mlp(self, tower: str, layer: int, hidden: torch.Tensor, s: torch.Tensor,
            valid: torch.Tensor, global_: torch.Tensor) -> None: ...


@dataclass
class _State:
    x: torch.Tensor
    valid: torch.Tensor
    protected: torch.Tensor
    global_: torch.Tensor
    position: torch.Tensor        # original index of each token (for order, causality, restore)
    candidates0: torch.Tensor     # candidate count at the tower input, per example
    fused: torch.Tensor | None = None   # [B, N] marks the merged token, when merging
    mass: torch.Tensor | None = None    # [B] accumulated score mass of the merged token
    distinct: torch.Tensor | None = None   # [B, N] distinctiveness from the first dropping site


@dataclass
class ManagedTower:
    spec: ManagedTowerSpec
    model: nn.Module
    controls: list[BlockControl] = field(default_factory=list)
    observer: Observer | None = None
    head_reduce: str = "max"
    #: when False, CIT uses the plain attention map (the 'CIT off' ablation)
    head_masked_scores: bool = True
    #: per example token counts of the last forward: (layer, 'attn' | 'mlp') -> [B]
    last_counts: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    last_valid: torch.Tensor | None = None
    #: per site layer, the original positions [B, N'] of the tokens it kept in the last forward
    #: and which of them are real (valid [B, N']); the merged token's position is N
    last_kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _call_kwargs: dict[str, Any] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        if not self.controls:
            self.controls = [BlockControl() for _ in self.layers]

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.model.get_submodule(self.spec.encoder), self.spec.layers)

    # ---- installation
    def install(self) -> None:
        root = self.model.get_submodule(self.spec.root)
        encoder = self.model.get_submodule(self.spec.encoder)

        signature = inspect.signature(root.forward)

        def capture(module, args, kwargs):
            # by name, however the tower was called (positional arguments included)
            self._call_kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)

        self._handles.append(root.register_forward_pre_hook(capture, with_kwargs=True))
        encoder.forward = self.forward  # instance attribute: the module's __call__ finds it first

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        encoder = self.model.get_submodule(self.spec.encoder)
        if "forward" in vars(encoder):
            del encoder.forward

    # ---- the forward
    def forward(self, *args, **kwargs) -> TowerOutput:
        hidden = args[0] if args else kwargs.get("inputs_embeds", kwargs.get("hidden_states"))
        marks = self.spec.marks(self._call_kwargs, hidden)
        st = self._start(hidden, marks)
        pending = last_s = None   # the previous block's MLP activation is scored with this block's tokens
        states = kwargs.get("encoder_hidden_states")
        states_valid = None if states is None else _valid_from_mask(kwargs.get("encoder_attention_mask"),
                                                                     states)
        self.last_counts, self.last_kept = {}, {}
        for i, layer in enumerate(self.layers):
            ctl = self.controls[i]
            self.last_counts[(i, "attn")] = st.valid.sum(dim=1)
            s, context = self._attention(layer, st, ctl)
            if self.observer is not None:
                self.observer.attention(self.spec.tower, i, context, s, st.valid, st.global_)
                if pending is not None:
                    self.observer.mlp(self.spec.tower, i - 1, pending, s, st.valid, st.global_)
            st.x = self.spec.ops.attention_out(layer, st.x, context)
            if ctl.site is not None and s is not None:
                st, s = self._drop(st, s, ctl.site, i)
            if states is not None and self.spec.ops.has_cross(layer):
                st.x = self._cross(layer, st, ctl, states, states_valid, s, i)
            self.last_counts[(i, "mlp")] = st.valid.sum(dim=1)
            hidden_act = self.spec.ops.mlp_hidden(layer, st.x)
            if ctl.mlp_mask is not None:
                hidden_act = hidden_act * ctl.mlp_mask
            pending = hidden_act
            st.x = self.spec.ops.mlp_out(layer, st.x, hidden_act)
            last_s = s
        if self.observer is not None and pending is not None and last_s is not None:
            self.observer.mlp(self.spec.tower, len(self.layers) - 1, pending, last_s, st.valid, st.global_)
        return TowerOutput(last_hidden_state=self._finish(st, hidden))

    def _needs_scores(self, ctl: BlockControl) -> bool:
        return self.observer is not None or (ctl.site is not None and ctl.site.theta > 0)

    def _start(self, hidden: torch.Tensor, marks: TokenMarks) -> _State:
        b, n = hidden.shape[:2]
        position = torch.arange(n, device=hidden.device).expand(b, n)
        cand0 = (marks.valid & ~marks.protected).sum(dim=1)
        return _State(hidden, marks.valid, marks.protected & marks.valid, marks.global_ & marks.valid,
                      position, cand0)

    def _attention(self, layer: nn.Module, st: _State, ctl: BlockControl):
        ops = self.spec.ops
        q, k, v = ops.qkv(layer, st.x)
        h, d = q.shape[1], q.shape[-1]
        allowed = st.valid[:, None, :]                                   # keys: [B, 1, N]
        if self.spec.causal:
            allowed = allowed & (st.position[:, None, :] <= st.position[:, :, None])
        logits = (q @ k.transpose(-1, -2)) * d ** -0.5
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
        probs = logits.softmax(dim=-1)
        s = None
        if self._needs_scores(ctl):
            with torch.no_grad():
                mask = ctl.head_mask if self.head_masked_scores else None
                s = T.attention_received(probs.detach(), st.valid, st.global_,
                                         None if mask is None else mask.detach(), self.head_reduce)
        p = ops.attention_dropout(layer) if self.model.training else 0.0
        context = F.dropout(probs, p, self.model.training) @ v if p else probs @ v
        if ctl.head_mask is not None:
            context = context * ctl.head_mask.view(1, h, 1, 1).to(context.dtype)
        return s, context.transpose(1, 2).reshape(st.x.shape[0], st.x.shape[1], h * d)

    def _cross(self, layer, st: _State, ctl: BlockControl, states, states_valid, s, i) -> torch.Tensor:
        """Cross-attention of the kept tokens to the other tower's states, heads scaled by mask."""
        ops = self.spec.ops
        q, k, v = ops.cross_qkv(layer, st.x, states)
        h, d = q.shape[1], q.shape[-1]
        logits = (q @ k.transpose(-1, -2)) * d ** -0.5
        logits = logits.masked_fill(~states_valid[:, None, None, :], torch.finfo(logits.dtype).min)
        probs = logits.softmax(dim=-1)
        p = ops.attention_dropout(layer) if self.model.training else 0.0
        context = F.dropout(probs, p, self.model.training) @ v if p else probs @ v
        if ctl.cross_mask is not None:
            context = context * ctl.cross_mask.view(1, h, 1, 1).to(context.dtype)
        context = context.transpose(1, 2).reshape(st.x.shape[0], st.x.shape[1], h * d)
        self.last_counts[(i, "cross")] = st.valid.sum(dim=1)
        self.last_counts[(i, "cross_kv")] = states_valid.sum(dim=1)
        if self.observer is not None and s is not None:
            self.observer.attention(self.spec.cross_tower, i, context, s, st.valid, st.global_)
        return ops.cross_out(layer, st.x, context)

    def _drop(self, st: _State, s: torch.Tensor, site: SiteControl, layer: int):
        cand = st.valid & ~st.protected
        if site.theta <= 0:
            return st, s
        if site.score == "distinct":
            # measured where every token is still there: once the background is mostly gone,
            # the last background tokens would be the unusual ones
            if st.distinct is None:
                st.distinct = T.distinctiveness(st.x.detach(), st.valid & ~st.global_)
            scores = T.normalise(st.distinct, cand)
        else:
            scores = T.normalise(s, cand)
        floor = T.min_keep_count(st.candidates0, site.min_keep_frac)
        keep = T.keep_mask(scores, cand, st.protected, site.theta, floor)
        keep &= st.valid
        if site.merge:
            st, keep = self._merge(st, scores, keep)
            s = F.pad(s, (0, st.x.shape[1] - s.shape[1]))  # the merged token has no score yet
        index, valid = T.compaction(keep)
        g = lambda t: T.gather_tokens(t, index)
        new = _State(g(st.x), valid, g(st.protected) & valid, g(st.global_) & valid,
                     g(st.position), st.candidates0,
                     None if st.fused is None else g(st.fused) & valid, st.mass,
                     None if st.distinct is None else g(st.distinct) * valid.to(st.distinct.dtype))
        self.last_kept[layer] = (new.position, valid)
        return new, g(s) * valid.to(s.dtype)

    def _merge(self, st: _State, scores: torch.Tensor, keep: torch.Tensor):
        """Fold the dropped tokens into one protected token, weighted by score (EViT / MADTP)."""
        dropped = (st.valid & ~keep).to(st.x.dtype)
        w = scores * dropped                                               # [B, N]
        mass = w.sum(dim=1)                                                # [B]
        pooled = torch.einsum("bn,bnd->bd", w, st.x)
        if st.fused is None:  # open a slot at the end, valid only where something was dropped
            b = st.x.shape[0]
            has = mass > 0
            z = torch.zeros(b, 1, dtype=torch.bool, device=st.x.device)
            st = _State(torch.cat([st.x, torch.zeros_like(st.x[:, :1])], 1),
                        torch.cat([st.valid, has[:, None]], 1), torch.cat([st.protected, has[:, None]], 1),
                        torch.cat([st.global_, z], 1),
                        torch.cat([st.position, st.position.new_full((b, 1), st.position.shape[1])], 1),
                        st.candidates0, torch.cat([torch.zeros_like(st.valid), has[:, None]], 1),
                        torch.zeros(b, dtype=st.x.dtype, device=st.x.device),
                        None if st.distinct is None else F.pad(st.distinct, (0, 1)))
            keep = torch.cat([keep, has[:, None]], 1)
        total = (st.mass + mass).clamp_min(1e-12)
        slot = st.fused.to(st.x.dtype).unsqueeze(-1)                      # [B, N, 1]
        old = (st.x * slot).sum(dim=1)                                     # [B, D]
        fused = (old * st.mass[:, None] + pooled) / total[:, None]
        x = st.x * (1 - slot) + fused[:, None, :] * slot
        st.x, st.mass = x, st.mass + mass
        return st, keep

    def _finish(self, st: _State, hidden: torch.Tensor) -> torch.Tensor:
        self.last_valid = st.valid
        if self.spec.output == "compact":
            return st.x
        b, n, d = hidden.shape
        out = torch.zeros(b, n, d, dtype=st.x.dtype, device=st.x.device)
        real = st.valid & (st.position < n)   # the merged token has no original position
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(st.position)
        return out.index_put((rows[real], st.position[real]), st.x[real])


def _valid_from_mask(mask: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor:
    """[B, N_kv] bool from an encoder mask: 0/1 per key, or HF's additive [B, 1, 1, N_kv] form."""
    b, n = states.shape[:2]
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=states.device)
    if mask.dim() == 4:
        return mask.reshape(b, -1)[:, -n:] == 0
    return mask.bool()
