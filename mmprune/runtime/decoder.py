"""Image-token pruning inside a LLaVA-style decoder (tokens.md §2–§4, site `LLM_PRE_LAYER(k)`).

`DecoderTokenPruner` owns the Llama decoder's layer loop (its `forward`, installed as an instance
attribute like `ManagedTower`'s): before each site's layer it scores the image tokens with the
attention probe of one query token per example (the token that ends the prompt) and keeps the
top share of the example's original image tokens, in their original order. Every other token
(BOS, instruction, answer, generated tokens) is protected. PDrop is several sites with a
geometric keep ratio and renumbered positions; FastV is one site, scored with the previous
layer's attention, with original positions.

Prefill drops tokens and records, per stage (the layers between two sites), which original
tokens its KV cache holds. A decode step reuses those records: each stage's layers get a key
mask over their own (shorter) cache and the positions the prefill gave that stage, so cached
generation gives what recomputing the whole sequence without a cache gives (causal attention:
the query token never sees generated tokens, so the drop decisions are the same).
The last hidden state is scattered back to the input's length (zeros where tokens were dropped,
which are image positions that carry no labels), so logits and labels keep their alignment.

For CoMP the pruner is also the decoder's host (what `ManagedTower` is for CLIP and BLIP):
`controls` hold soft head and channel masks, applied to the inputs of `o_proj` and `down_proj`;
with an `observer` the probe runs at every layer and CIP receives each layer's masked head
contexts and MLP activations with the probe scores as token weights (comp.md §3); and sites can
keep candidates by a threshold θ per token mode (image tokens: `vision_tokens`, instruction
tokens: `language_tokens`), |Cand|·S ≥ θ, besides PDrop's fixed share.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from mmprune.errors import MMPruneError
from mmprune.models.kv_cache import CACHE_KWARG, pop_cache
from mmprune.runtime import tokens as T
from mmprune.runtime.probe import attention_probe
from mmprune.runtime.tower import BlockControl, Observer

PositionPolicy = Literal["keep_original", "renumber"]
#: the graph tower whose unit groups are the decoder's layers (LLaVA adapter: 'language')
DECODER_TOWER = "language"


@dataclass(frozen=True)
class DecoderSite:
    """Tokens are dropped before decoder layer `layer` runs, down to `keep` of the example's
    original image tokens (a share of the original count, not of what the last site left)."""

    layer: int
    keep: float


@dataclass
class _Stage:
    first_layer: int
    index: torch.Tensor     # [B, L] original index of each token the stage's layers hold
    valid: torch.Tensor     # [B, L] false for padding (prompt padding, or ragged fill)
    offset: torch.Tensor    # [B] tokens dropped before this stage (renumbered positions)


@dataclass
class _Tokens:
    x: torch.Tensor         # [B, n, D]
    index: torch.Tensor     # [B, n] original indices
    valid: torch.Tensor     # [B, n]
    image: torch.Tensor     # [B, n] image tokens (candidates of `vision_tokens`)
    instruction: torch.Tensor   # [B, n] instruction tokens (candidates of `language_tokens`)
    pos: torch.Tensor       # [B, n] position ids fed to RoPE
    offset: torch.Tensor    # [B] tokens dropped so far


def geometric_sites(layers: list[int], ratio: float) -> list[DecoderSite]:
    """PyramidDrop's keep shares: the s-th site (1-based, by layer) keeps ratio^s of the image tokens."""
    return [DecoderSite(layer, ratio ** (s + 1)) for s, layer in enumerate(sorted(layers))]


def pdrop_layers(num_layers: int, stages: int = 3) -> list[int]:
    """PyramidDrop's site layers round(L·s/(stages+1)), s = 1..stages (layer 0 never a site)."""
    layers = {round(num_layers * s / (stages + 1)) for s in range(1, stages + 1)}
    return sorted(layers & set(range(1, num_layers)))


def pdrop_sites(num_layers: int, ratio: float = 0.5, stages: int = 3) -> list[DecoderSite]:
    """PyramidDrop's schedule: sites at `pdrop_layers`, keeping ratio^s of the image tokens."""
    return geometric_sites(pdrop_layers(num_layers, stages), ratio)


class DecoderTokenPruner:
    """Installed on a `LlavaForConditionalGeneration` (`model.model.language_model`).

    `instruction_tokens(input_ids, valid)` marks the instruction text (the `language_tokens`
    candidates); without it only image tokens are candidates.
    """

    def __init__(self, model: nn.Module, sites: list[DecoderSite], image_token_id: int,
                 query_index: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 position: PositionPolicy = "renumber", probe: Literal["current", "previous"] = "current",
                 instruction_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.lm = model.model.language_model
        self.image_token_id = image_token_id
        self.query_index = query_index
        self.instruction_tokens = instruction_tokens
        self.position = position
        self.probe = probe
        self.set_sites(sites)
        self.enabled = True
        self.tower = DECODER_TOWER
        #: θ per token mode (0: the mode keeps every candidate), shared by all sites
        self.theta: dict[str, float] = {m: 0.0 for m in self.token_modes}
        #: share of a mode's original candidates every site keeps at least (θ rule only)
        self.min_keep_frac = 0.05
        #: soft masks per layer (CoMP), and what receives CIP statistics
        self.controls = [BlockControl() for _ in range(self.lm.config.num_hidden_layers)]
        self.observer: Observer | None = None
        self.head_reduce = "mean"
        self.head_masked_scores = True
        self._mask_handles: list = []
        self._captured: dict[str, torch.Tensor] = {}
        self._observing = False
        self._input_ids: torch.Tensor | None = None
        self._query: torch.Tensor | None = None     # [B] original index of each probe query
        self._n_image: torch.Tensor | None = None   # [B] image tokens of each prompt
        self._stages: list[_Stage] = []
        self._prefill_len = 0
        self._cache = None          # the KV cache the last prefill filled, and its length now
        self._cache_len = 0
        self._handle = None
        #: per example, tokens entering each layer during the last prefill: layer -> [B]
        self.last_counts: dict[int, torch.Tensor] = {}

    @property
    def token_modes(self) -> list[str]:
        return ["vision_tokens"] + (["language_tokens"] if self.instruction_tokens is not None else [])

    def set_sites(self, sites: list[DecoderSite]) -> None:
        n = self.lm.config.num_hidden_layers
        layers = [s.layer for s in sites]
        if len(set(layers)) != len(layers) or any(not 0 < s.layer < n for s in sites):
            raise MMPruneError(f"decoder token sites need distinct layers in 1..{n - 1}, got {layers}")
        if any(not 0.0 < s.keep <= 1.0 for s in sites):
            raise MMPruneError(f"decoder token sites keep a share in (0, 1], got {[s.keep for s in sites]}")
        self.sites = sorted(sites, key=lambda s: s.layer)

    @property
    def drops(self) -> bool:
        """Whether any site can drop a token (a share below 1 or a positive θ)."""
        return bool(self.sites) and (any(s.keep < 1.0 for s in self.sites)
                                     or any(v > 0 for v in self.theta.values()))

    def policy(self) -> dict:
        """What `mmprune.json` saves: sites as [layer, keep], position policy, probe layer, and
        the θ of each token mode with its floor."""
        return {"sites": [[s.layer, s.keep] for s in self.sites], "position": self.position,
                "probe": self.probe, "theta": dict(self.theta), "min_keep_frac": self.min_keep_frac,
                "head_reduce": self.head_reduce}

    # ---- installation
    def install(self) -> None:
        if "forward" in vars(self.lm):
            raise MMPruneError("the decoder already has a replaced forward (another pruner?)")

        def capture(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._input_ids = ids
        self._handle = self.model.model.register_forward_pre_hook(capture, with_kwargs=True)
        for i, layer in enumerate(self.lm.layers[: len(self.controls)]):
            self._mask_handles += [
                layer.self_attn.o_proj.register_forward_pre_hook(self._masked_input(i, "head")),
                layer.mlp.down_proj.register_forward_pre_hook(self._masked_input(i, "channel"))]
        self.lm.forward = self.forward

    def uninstall(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for h in self._mask_handles:
            h.remove()
        self._mask_handles.clear()
        vars(self.lm).pop("forward", None)

    def _masked_input(self, i: int, kind: str):
        """A pre-hook scaling head contexts (o_proj input) or MLP channels (down_proj input) by
        layer `i`'s soft mask; while observing it keeps the masked input for CIP."""
        def hook(module, args):
            x = args[0]
            ctl = self.controls[i]
            mask = ctl.head_mask if kind == "head" else ctl.mlp_mask
            if mask is not None:
                if kind == "head":
                    mask = mask.repeat_interleave(x.shape[-1] // mask.shape[0])
                x = x * mask.reshape(-1).to(x.dtype)
            if self._observing:
                self._captured[kind] = x.detach()
            return None if mask is None else (x, *args[1:])
        return hook

    # ---- the decoder loop
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        lm = self.lm
        cache = pop_cache(kwargs, past_key_values)   # transformers ≥ 5.24 passes it as `cache`
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=lm.config)
        past = cache.get_seq_length() if cache is not None else 0
        b, n, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = (torch.arange(n, device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=lm.config, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, **{CACHE_KWARG: cache},
                                  position_ids=position_ids)
        x = inputs_embeds
        pos_emb = lm.rotary_emb(x, position_ids=position_ids)
        decoding = past > 0      # a decode step: the stages recorded at the prefill apply
        if decoding and self._stages and (cache is not self._cache or past != self._cache_len):
            raise MMPruneError("decoder token pruning: this KV cache was not filled by the last "
                               "prefill (continuing an earlier cache with a new prompt is not "
                               "supported); start generation from an empty cache")
        dropping = self.enabled and self.drops
        observe = self.observer is not None and not decoding
        tokens = self._start(x, attention_mask, position_ids) if (dropping or observe) and not decoding \
            else None
        if not decoding:
            self._stages, self._prefill_len = [], n
            self.last_counts = {}
        self._cache, self._cache_len = cache, past + n
        decode_pos = position_ids       # every stage offsets the original decode positions
        site_at = {s.layer: s for s in self.sites} if dropping else {}
        stages = {st.first_layer: st for st in self._stages}
        prev = None     # the previous layer's input and RoPE tables (FastV scores with them)
        pending = None  # the previous layer's MLP activation: CIP scores it with this layer's probe
        self._observing = observe
        try:
            for i, layer in enumerate(lm.layers[: lm.config.num_hidden_layers]):
                stage = stages.get(i) if decoding else None
                s = None
                if stage is not None:
                    mask, pos_emb, position_ids = self._decode_stage(stage, x, attention_mask,
                                                                     decode_pos, past)
                elif tokens is not None:
                    tokens.x = x
                    if observe or (i in site_at and self.probe == "current"):
                        s = self._scores(layer, i, tokens, x, pos_emb)
                    if pending is not None:     # layer i − 1's MLP ran on exactly these tokens
                        self._observe("mlp", i - 1, pending, s, tokens)
                    if i in site_at:
                        score = s if self.probe == "current" else \
                            self._scores(lm.layers[i - 1], i - 1, tokens, *prev)
                        kept = self._drop(tokens, site_at[i], score)
                        if kept is not None:      # a site that keeps everything changes nothing
                            tokens = kept
                            x, position_ids = tokens.x, tokens.pos
                            mask = self._prefill_mask(tokens, x.dtype)
                            pos_emb = lm.rotary_emb(x, position_ids=position_ids)
                            self._stages.append(_Stage(i, tokens.index, tokens.valid, tokens.offset))
                            if observe:           # the layer's attention runs on the kept tokens
                                s = self._scores(layer, i, tokens, x, pos_emb)
                    self.last_counts[i] = tokens.valid.sum(1)
                prev = (x, pos_emb)
                x = layer(x, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids,
                          use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs)
                if observe:
                    self._observe("attention", i, self._captured.pop("head"), s, tokens)
                    pending = self._captured.pop("channel")
            if observe and pending is not None:      # the last MLP: its own layer's scores
                self._observe("mlp", len(self.controls) - 1, pending, s, tokens)
        finally:
            self._observing = False
            self._captured.clear()
        x = lm.norm(x)
        if tokens is not None and self._stages:
            full = x.new_zeros(b, n, x.shape[-1])
            rows = tokens.index.masked_fill(~tokens.valid, n)      # ragged fill goes to a dump row
            full = torch.cat([full, full[:, :1]], 1).scatter(
                1, rows.unsqueeze(-1).expand_as(x), x)[:, :n]
            x = full
        self._input_ids = None      # captured per call: never reused by a later one
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_KWARG: cache})

    # ---- prefill
    def _start(self, x: torch.Tensor, attention_mask, position_ids) -> _Tokens:
        b, n, _ = x.shape
        ids = self._input_ids
        if ids is None or ids.shape != (b, n):
            raise MMPruneError("decoder token pruning needs the prompt's input_ids (to find the "
                               "image tokens); call the model with input_ids, not inputs_embeds")
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(b, n, dtype=torch.bool, device=x.device))
        index = torch.arange(n, device=x.device).expand(b, n)
        self._query = self.query_index(ids, valid)
        self._sink = valid.int().argmax(1)       # the first real token: an attention sink
        image = (ids == self.image_token_id) & valid
        instruction = torch.zeros_like(image)
        if self.instruction_tokens is not None:
            instruction = self.instruction_tokens(ids, valid) & valid & ~image \
                & (index != self._query[:, None])
        self._n_image = image.sum(1)
        self._n_cand0 = {"vision_tokens": self._n_image, "language_tokens": instruction.sum(1)}
        return _Tokens(x, index, valid, image, instruction, position_ids.expand(b, n),
                       torch.zeros(b, dtype=torch.long, device=x.device))

    def _scores(self, layer: nn.Module, i: int, t: _Tokens, x: torch.Tensor,
                pos_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Raw token scores [B, n]: the probe query's attention, heads combined as CIT says
        (each head's row scaled by its soft mask, comp.md §3.1)."""
        # the query's current index: where its original index sits now (it is never dropped)
        query = (t.index == self._query[:, None]).float().argmax(1)
        with torch.no_grad():       # scores select tokens; no gradient flows through them
            probs = attention_probe(layer, x, query, pos_emb, self._allowed(t, query))
        mask = self.controls[i].head_mask if self.head_masked_scores else None
        return T.reduce_heads(probs, None if mask is None else mask.detach().float(), self.head_reduce)

    def _observe(self, kind: str, i: int, act: torch.Tensor, s: torch.Tensor, t: _Tokens) -> None:
        """CIP statistics of layer `i`: token weights from probe scores; no global token, and the
        sink (the first real token) weighs 0 (comp.md §3.2, exclude_sink)."""
        valid = t.valid & (t.index != self._sink[:, None])
        fn = self.observer.attention if kind == "attention" else self.observer.mlp
        fn(self.tower, i, act, s.to(act.dtype), valid, torch.zeros_like(valid))

    def _allowed(self, t: _Tokens, query: torch.Tensor) -> torch.Tensor:
        q_orig = t.index.gather(1, query[:, None])
        return t.valid & (t.index <= q_orig)

    def _drop(self, t: _Tokens, site: DecoderSite, score: torch.Tensor) -> _Tokens | None:
        """The tokens left after `site`, by raw scores `score` [B, n]; None when the site keeps
        every token. Image tokens keep the site's share of the original count (PDrop), then
        candidates of each token mode pass |Cand|·S ≥ θ (CoMP); everything else is protected."""
        image = t.image
        if site.keep < 1.0:
            keep_n = torch.ceil(site.keep * self._n_image.float() - 1e-6).long()
            ranked = score.masked_fill(~image, float("-inf"))
            order = ranked.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            image = image & (rank < keep_n[:, None])
        keep = ~(t.image | t.instruction)
        keep |= self._threshold(image, score, "vision_tokens")
        keep |= self._threshold(t.instruction, score, "language_tokens")
        return None if bool(keep.all()) else self._gather(t, keep)

    def _threshold(self, cand: torch.Tensor, score: torch.Tensor, mode: str) -> torch.Tensor:
        """Candidates with |Cand|·S ≥ θ of `mode`, at least the top ⌈min_keep_frac·N₀⌉."""
        theta = self.theta.get(mode, 0.0)
        if theta <= 0:
            return cand
        floor = T.min_keep_count(self._n_cand0[mode], self.min_keep_frac)
        return T.keep_mask(T.normalise(score, cand), cand, torch.zeros_like(cand), theta, floor)

    def _gather(self, t: _Tokens, keep: torch.Tensor) -> _Tokens:
        b, n = keep.shape
        counts = keep.sum(1)
        width = int(counts.max())
        # kept tokens first, in their original order; the ragged tail points at token 0, invalid
        key = torch.where(keep, torch.arange(n, device=keep.device), n + torch.arange(n, device=keep.device))
        sel = key.argsort(dim=1)[:, :width]
        filled = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
        sel = sel.masked_fill(~filled, 0)
        dropped = ~keep
        before = dropped.long().cumsum(1) - dropped.long()
        pos = t.pos.gather(1, sel)
        if self.position == "renumber":
            pos = pos - before.gather(1, sel)
        g = lambda v: v.gather(1, sel)                                        # noqa: E731
        x = t.x.gather(1, sel.unsqueeze(-1).expand(-1, -1, t.x.shape[-1]))
        return _Tokens(x, g(t.index), g(t.valid) & filled, g(t.image) & filled,
                       g(t.instruction) & filled, pos, t.offset + dropped.sum(1))

    def _prefill_mask(self, t: _Tokens, dtype: torch.dtype) -> torch.Tensor:
        causal = t.index[:, None, :] <= t.index[:, :, None]                  # [B, q, k]
        allowed = causal & t.valid[:, None, :]
        allowed |= torch.eye(t.index.shape[1], dtype=torch.bool, device=t.index.device)
        return _additive(allowed, dtype)

    # ---- decode
    def _decode_stage(self, stage: _Stage, x: torch.Tensor, attention_mask, position_ids, past: int):
        b, q, _ = x.shape
        n0 = self._prefill_len
        prompt_valid = (attention_mask[:, :n0].bool().gather(1, stage.index) if attention_mask is not None
                        else torch.ones_like(stage.valid)) & stage.valid
        later = (attention_mask[:, n0:].bool() if attention_mask is not None
                 else torch.ones(b, past - n0 + q, dtype=torch.bool, device=x.device))
        keys = torch.cat([prompt_valid, later], 1)                           # [B, L + past − n0 + q]
        allowed = keys[:, None, :].expand(b, q, -1).clone()
        new = keys.shape[1] - q
        allowed[:, :, new:] &= torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        pos = position_ids.expand(b, q)
        if self.position == "renumber":
            pos = pos - stage.offset[:, None]
        return _additive(allowed, x.dtype), self.lm.rotary_emb(x, position_ids=pos), pos


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B, q, k] boolean mask as the additive [B, 1, q, k] mask eager and SDPA attention take."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
