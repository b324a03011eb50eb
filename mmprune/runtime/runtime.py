"""`TokenRuntime`: the managed towers of one model, addressed by the graph's unit-group ids.

Passes talk to the runtime, not to towers: they set soft masks by group id ('vision.3.attn'),
token thresholds per tower, and read per-example token counts for the cost model. The runtime's
token policy is what `mmprune.json` saves and `mmprune.load` restores.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch

from mmprune.errors import MMPruneError
from mmprune.graph.model_graph import ModelGraph
from mmprune.runtime.decoder import DecoderSite, DecoderTokenPruner, pdrop_layers
from mmprune.runtime.tower import ManagedTower, Observer, SiteControl

#: attribute of the model under which the installed runtime is kept
ATTR = "_mmprune_runtime"
#: the token mode of each managed tower's sites (CLIP, BLIP); a decoder's sites serve both modes
TOKEN_TOWERS = {"vision_tokens": "vision", "language_tokens": "language"}
#: what a managed tower's sites may rank tokens by (SiteControl.score)
SCORES = ("attention", "distinct")


class TokenRuntime:
    def __init__(self, graph: ModelGraph, head_reduce: str = "max"):
        self.graph = graph
        adapter = graph.adapter
        self.towers: dict[str, ManagedTower] = {
            spec.tower: ManagedTower(spec, adapter.model, head_reduce=head_reduce)
            for spec in adapter.managed_towers()}
        #: a decoder LLM's token sites, and CoMP's masks and statistics in it (LLaVA), if any
        self.decoder: DecoderTokenPruner | None = None
        self.installed = False

    # ---- lifecycle
    @classmethod
    def attach(cls, graph: ModelGraph, **kwargs) -> TokenRuntime:
        """The runtime installed on `graph`'s model, creating and installing one if needed."""
        model = graph.adapter.model
        rt = getattr(model, ATTR, None)
        if rt is None:
            rt = cls(graph, **kwargs)
            rt.install()
            return rt
        for spec in graph.adapter.managed_towers():   # towers released earlier come back
            if spec.tower not in rt.towers:
                tower = ManagedTower(spec, model, head_reduce=rt.policy()["head_reduce"])
                tower.install()
                rt.towers[spec.tower] = tower
        return rt

    def install(self) -> None:
        model = self.graph.adapter.model
        if getattr(model, ATTR, None) not in (None, self):
            raise MMPruneError("a token-pruning runtime is already installed on this model")
        for t in self.towers.values():
            t.install()
        object.__setattr__(model, ATTR, self)  # not a submodule: stays out of state_dict
        self.installed = True

    def uninstall(self) -> None:
        for t in self.towers.values():
            t.uninstall()
        self.set_decoder([])
        model = self.graph.adapter.model
        if getattr(model, ATTR, None) is self:
            object.__delattr__(model, ATTR)
        self.installed = False

    def release_idle(self) -> None:
        """Hand towers without token sites back to their own (fused-kernel) forward, and the
        decoder too when its sites drop nothing; uninstall the runtime when nothing is left.
        Call when masks are gone (after physical removal)."""
        for name in [n for n, t in self.towers.items() if all(c.site is None for c in t.controls)]:
            self.towers.pop(name).uninstall()
        if self.decoder is not None and not self.decoder.drops:
            self.set_decoder([])
        if not self.towers and self.decoder is None:
            self.uninstall()

    def manage_decoder(self) -> DecoderTokenPruner:
        """The decoder's pruner, installed without sites if there is none yet: CoMP's host for
        decoder masks, statistics and θ sites (LLaVA-style models)."""
        if self.decoder is None:
            self.decoder = self.graph.adapter.decoder_token_pruner([], "renumber", "current")
            self.decoder.install()
        return self.decoder

    @property
    def active(self) -> bool:
        """Whether any token is dropped anywhere (tower sites or decoder sites)."""
        return bool(self.policy()["towers"]) or (self.decoder is not None and self.decoder.drops)

    def set_decoder(self, sites: list[DecoderSite], position: str = "renumber",
                    probe: str = "current", theta: dict[str, float] | None = None,
                    min_keep_frac: float = 0.05) -> None:
        """Token sites inside the decoder LLM (tokens.md LLM_PRE_LAYER), keeping a share of the
        image tokens and, with `theta`, each mode's candidates above θ; [] removes them."""
        if self.decoder is not None:
            self.decoder.uninstall()
            self.decoder = None
        if sites:
            decoder = self.graph.adapter.decoder_token_pruner(sites, position, probe)
            decoder.theta.update(theta or {})
            decoder.min_keep_frac = min_keep_frac
            decoder.install()
            self.decoder = decoder

    # ---- controls
    def host(self, tower: str) -> ManagedTower | DecoderTokenPruner | None:
        """What runs `tower`'s blocks with masks: its managed tower, the host of its
        cross-attention, or the decoder pruner for the decoder's tower."""
        if tower in self.towers:
            return self.towers[tower]
        if self.decoder is not None and self.decoder.tower == tower:
            return self.decoder
        return next((t for t in self.towers.values() if t.spec.cross_tower == tower), None)

    def _hosts(self) -> list[ManagedTower | DecoderTokenPruner]:
        return [*self.towers.values(), *([self.decoder] if self.decoder is not None else [])]

    def set_mask(self, gid: str, mask: torch.Tensor | None) -> None:
        """Soft mask of a head or channel group, one value per current unit (None: all ones)."""
        group = self.graph.groups.get(gid)
        host = None if group is None else self.host(group.tower)
        if host is None:
            raise MMPruneError(f"'{gid}' is not a unit group of a managed tower or decoder "
                               f"(managed: {', '.join(self.towers) or 'none'})")
        ctl = host.controls[group.layer]
        if mask is not None and mask.shape != (group.size,):
            raise MMPruneError(f"mask for {gid} has shape {tuple(mask.shape)}, expected ({group.size},)")
        if group.kind == "head" and isinstance(host, ManagedTower) and group.tower != host.spec.tower:
            ctl.cross_mask = mask
        elif group.kind == "head":
            ctl.head_mask = mask
        else:
            ctl.mlp_mask = None if mask is None else mask.view(1, 1, -1)

    def clear_masks(self) -> None:
        for host in self._hosts():
            for ctl in host.controls:
                ctl.head_mask = ctl.mlp_mask = ctl.cross_mask = None

    def set_sites(self, tower: str, site: SiteControl | None, layers: list[int] | None = None) -> None:
        """Token dropping for `tower` at `layers` (default: every block); None turns it off."""
        if tower not in self.towers:
            raise MMPruneError(f"tower '{tower}' has no token sites (managed: {', '.join(self.towers)})")
        t = self.towers[tower]
        if site is not None and site.merge and t.spec.causal:
            raise MMPruneError(f"merging dropped tokens is not supported in the causal '{tower}' tower")
        for i, ctl in enumerate(t.controls):
            ctl.site = site if layers is None or i in layers else None

    def _site_layers(self, tower: str) -> list[int]:
        """The blocks of a managed tower that have a token site."""
        return [i for i, c in enumerate(self.towers[tower].controls) if c.site is not None]

    def theta(self, tower: str) -> float:
        """θ of `tower`'s sites (0 for a tower without sites, or handed back)."""
        sites = [c.site for c in self.towers[tower].controls if c.site is not None] \
            if tower in self.towers else []
        return sites[0].theta if sites else 0.0

    # ---- token modes (CoMP): a managed tower's sites, or the decoder's sites
    def token_modes(self) -> dict[str, str]:
        """Token mode -> the graph tower whose token counts it changes."""
        if self.decoder is not None:
            return {m: self.decoder.tower for m in self.decoder.token_modes}
        return {m: t for m, t in TOKEN_TOWERS.items() if t in self.towers}

    def enable_token_mode(self, mode: str, min_keep_frac: float, merge: bool = False,
                          layers: list[int] | None = None, score: str = "attention") -> None:
        """Sites for `mode` at θ = 0 (nothing dropped yet): every block of a managed tower, or the
        decoder's PyramidDrop boundaries round(L·{1/4, 1/2, 3/4}) (comp.md §4). `score` ranks a
        managed tower's tokens (SiteControl.score); a decoder's sites rank by attention only. A
        managed tower whose sites already drop tokens keeps them and their θ; asking it for other
        sites is an error (`_check_sites_kept`)."""
        if score not in SCORES:
            raise MMPruneError(f"token score must be one of {', '.join(SCORES)}, not {score!r}")
        if self.decoder is not None:
            if score != "attention":
                raise MMPruneError(f"a decoder LLM's token sites rank tokens by attention only; "
                                   f"{mode} asks for the '{score}' score")
            d = self.decoder
            if not d.sites:
                layers = pdrop_layers(len(d.controls)) if layers is None else layers
                d.set_sites([DecoderSite(i, 1.0) for i in layers])
            elif d.min_keep_frac != min_keep_frac:
                raise MMPruneError(f"a decoder LLM's token sites keep one share of tokens for both "
                                   f"token modes; {mode} asks for {min_keep_frac}, the other for "
                                   f"{d.min_keep_frac}: give min_token_frac one value")
            d.min_keep_frac = min_keep_frac
            return
        tower = TOKEN_TOWERS[mode]
        # a merged token has no place in causal order: causal towers only drop
        merge = merge and not self.towers[tower].spec.causal
        if self.theta(tower) == 0.0:
            self.set_sites(tower, SiteControl(0.0, min_keep_frac, merge, score), layers)
        else:
            self._check_sites_kept(mode, tower, SiteControl(0.0, min_keep_frac, merge, score), layers)

    def _check_sites_kept(self, mode: str, tower: str, asked: SiteControl, layers: list[int] | None) -> None:
        """Sites already dropping tokens (an earlier pass, a loaded export) are continued from
        their θ; asking for other sites would be silently ignored, so it is an error."""
        t = self.towers[tower]
        have_layers = self._site_layers(tower)
        have = t.controls[have_layers[0]].site
        # the blocks set_sites would give sites (it ignores repeated and out-of-range indices)
        want_layers = [i for i in range(len(t.controls)) if layers is None or i in layers]
        diffs = [f"{name} {h!r} (asked {w!r})" for name, h, w in (
            ("score", have.score, asked.score), ("floor", have.min_keep_frac, asked.min_keep_frac),
            ("merge", have.merge, asked.merge), ("layers", have_layers, want_layers)) if h != w]
        if diffs:
            raise MMPruneError(
                f"{mode}: the '{tower}' tower already drops tokens (θ={have.theta:.3g}, from an "
                f"earlier pass or a loaded export) with other sites: {'; '.join(diffs)}. Pruning "
                f"continues from the existing sites, so give this pass the same token_score, "
                f"token_layers, min_token_frac and merge_dropped, or leave {mode} out of its modes")

    def mode_theta(self, mode: str) -> float:
        if self.decoder is not None:
            return self.decoder.theta.get(mode, 0.0)
        return self.theta(TOKEN_TOWERS[mode])

    def set_mode_theta(self, mode: str, theta: float) -> None:
        if self.decoder is not None:
            self.decoder.theta[mode] = theta
            return
        for c in self.towers[TOKEN_TOWERS[mode]].controls:
            if c.site is not None:
                c.site.theta = theta

    def set_observer(self, observer: Observer | None) -> None:
        for host in self._hosts():
            host.observer = observer

    @property
    def observer(self) -> Observer | None:
        hosts = self._hosts()
        return hosts[0].observer if hosts else None

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """No statistics collection inside (measurements must not feed the importance scores)."""
        observer = self.observer
        self.set_observer(None)
        try:
            yield
        finally:
            self.set_observer(observer)

    @contextmanager
    def without_sites(self) -> Iterator[None]:
        """Every token kept inside (the dense model's token counts), sites restored after."""
        saved = {name: [c.site for c in t.controls] for name, t in self.towers.items()}
        for t in self.towers.values():
            for c in t.controls:
                c.site = None
        decoder_on = self.decoder is not None and self.decoder.enabled
        if self.decoder is not None:
            self.decoder.enabled = False
        try:
            yield
        finally:
            if self.decoder is not None:
                self.decoder.enabled = decoder_on
            for name, t in self.towers.items():
                for c, site in zip(t.controls, saved[name]):
                    c.site = site

    def set_cit(self, head_masked: bool) -> None:
        for host in self._hosts():
            host.head_masked_scores = head_masked

    # ---- measurements
    def counts(self) -> dict[str, torch.Tensor]:
        """Per-example tokens [B] at every unit group of the last forward (attn: in, mlp: kept,
        cross-attention: kept queries, and '<gid>:kv' the keys)."""
        out = {}
        for gid, g in self.graph.groups.items():
            if self.decoder is not None and g.tower == self.decoder.tower:
                if g.layer in self.decoder.last_counts:     # no drop inside a layer
                    out[gid] = self.decoder.last_counts[g.layer].double()
                continue
            t = self.host(g.tower)
            if t is None:
                continue
            cross = g.tower not in self.towers
            key = (g.layer, "cross" if cross else "attn" if g.kind == "head" else "mlp")
            if key in t.last_counts:
                out[gid] = t.last_counts[key].double()
            if cross and (g.layer, "cross_kv") in t.last_counts:
                out[f"{gid}:kv"] = t.last_counts[(g.layer, "cross_kv")].double()
        return out

    # ---- saved form
    def policy(self) -> dict[str, Any]:
        towers = {}
        for name, t in self.towers.items():
            layers = self._site_layers(name)
            if layers:
                towers[name] = {"layers": layers, **asdict(t.controls[layers[0]].site)}
        return {"head_reduce": next(iter(self.towers.values())).head_reduce if self.towers else "max",
                "towers": towers,
                "decoder": None if self.decoder is None else self.decoder.policy()}

    def apply_policy(self, policy: dict[str, Any]) -> None:
        for name, entry in policy.get("towers", {}).items():
            site = SiteControl(theta=float(entry["theta"]), min_keep_frac=float(entry["min_keep_frac"]),
                               merge=bool(entry["merge"]), score=str(entry.get("score", "attention")))
            if site.score not in SCORES:
                raise MMPruneError(f"saved token policy of tower '{name}': score {site.score!r} is "
                                   f"not one of {', '.join(SCORES)}")
            self.set_sites(name, site, list(entry["layers"]))
        for t in self.towers.values():
            t.head_reduce = policy.get("head_reduce", "max")
        if policy.get("decoder"):
            d = policy["decoder"]
            self.set_decoder([DecoderSite(int(layer), float(keep)) for layer, keep in d["sites"]],
                             d["position"], d["probe"],
                             {str(m): float(v) for m, v in d.get("theta", {}).items()},
                             float(d.get("min_keep_frac", 0.05)))
            self.decoder.head_reduce = d.get("head_reduce", "mean")


def runtime_of(model) -> TokenRuntime | None:
    return getattr(model, ATTR, None)
