"""`comp`: CoMP search — joint pruning of tokens and parameters to a FLOPs target (comp.md)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from mmprune.comp.mps import CANONICAL
from mmprune.comp.plots import plot_trajectory
from mmprune.comp.search import CompSearch
from mmprune.context import Context
from mmprune.passes.base import FitSplit, Pass, PassParams, at_least_one
from mmprune.training import Trainer, dense_teacher, is_main

Mode = Literal["vision_tokens", "language_tokens", "vision_params", "language_params", "cross_params"]
TokenMode = Literal["vision_tokens", "language_tokens"]
TokenScore = Literal["attention", "distinct"]
DEFAULT_MIN_TOKEN_FRAC = 0.05


class CompParams(PassParams):
    target: float = Field(0.5, gt=0.0, lt=1.0, description="FLOPs reduction to reach, relative to "
                          "the dense model (0.8 keeps 20% of the dense FLOPs per example).")
    modes: Annotated[Literal["all"] | list[Mode], at_least_one("mode")] = Field("all", description="Modes that may advance: 'all' "
                                               "(every mode the model has) or a list of "
                                               f"{', '.join(CANONICAL)}.")
    schedule: Literal["mps", "round_robin"] = Field("mps", description="mps: cost-driven choice with "
                                                    "history and exploration; round_robin: modes in "
                                                    "turn (the CIM-only ablation).")
    stage_quantum: float = Field(0.02, gt=0.0, le=0.5, description="Share of the dense FLOPs one "
                                 "stage removes.")
    k_min: int = Field(50, ge=1, description="Fewest training steps per stage.")
    search_steps: int = Field(2000, ge=1, description="Training steps the search is sized for: "
                              "K = max(k_min, search_steps · stage_quantum / target).")
    warmup_steps: int | None = Field(None, ge=0, description="Steps that only collect importance "
                                     "statistics before the first stage (default: K).")
    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate (cosine to 0 over the search).")
    kd_weight: float = Field(0.0, ge=0.0, description="Weight of distillation from the dense "
                             "model in the search's training steps (0: task loss only). Stages "
                             "are still priced by the task's validation quality.")
    kd_temperature: float = Field(1.0, gt=0.0, description="Softmax temperature of that distillation.")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay on weight matrices.")
    batch_size: int = Field(32, ge=2, description="Training batch size.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size of the validation subset and probe set.")
    rho: float = Field(0.2, ge=0.0, le=1.0, description="Exploration probability ρ.")
    tau: float = Field(5.0, gt=0.0, description="Exploration temperature τ over stages since a mode ran.")
    exploration: Literal["random", "stride"] = Field("random", description="When MPS explores: "
                                                     "'random', each choice with probability ρ "
                                                     "(the paper); 'stride', every 1/ρ-th choice "
                                                     "after the warm-up, so no run goes long "
                                                     "without exploring (seed 0's draws first fall "
                                                     "below 0.2 at the 26th). The mode explored is "
                                                     "drawn as before.")
    max_run: int | None = Field(None, ge=1, description="Most stages one mode may run in a row "
                                "(its warm-up stage counts; undone stages count); then the next "
                                "stage, after the warm-up, is chosen among the "
                                "others, so their costs are measured again on the model as it "
                                "is (null: no limit, the paper). Eq. 5 updates a cost only when "
                                "its mode runs, and with rho 0.2 a run can last 25 stages. "
                                "Unused under schedule 'round_robin'.")
    lambda0: float = Field(0.4, ge=0.0, le=1.0, description="History weight λ₀ of a mode run in the "
                           "previous stage (0: no history).")
    i_max: int = Field(5, ge=1, description="Stages after which a mode's old cost is forgotten.")
    cost_memory: Literal["ema", "median"] = Field("ema", description="A mode's cost R: 'ema', "
                                                  "its last stage cost blended with its history "
                                                  "(Eq. 5, λ₀ / i_max); 'median', the median of "
                                                  "its last `cost_window` stage costs (λ₀ and "
                                                  "i_max unused), so one noisy dear stage does "
                                                  "not shut the mode out until exploration "
                                                  "picks it again (from a mode's third stage: "
                                                  "of two costs the median is their mean). It "
                                                  "forgets by count, not age. Unused under "
                                                  "schedule 'round_robin'.")
    cost_window: int = Field(5, ge=1, description="With cost_memory 'median': how many of a "
                             "mode's last stage costs its median takes.")
    cip: bool = Field(True, description="Token-weighted parameter importance (off: plain structured Wanda).")
    cit: bool = Field(True, description="Head masks scale attention maps before token scoring "
                      "(off: plain attention).")
    head_reduce: Literal["max", "mean"] | None = Field(None, description="How CIT combines heads: "
                                                       "max, or the mask-weighted mean (default: "
                                                       "max in ViT/BERT towers, paper Eq. 6; mean "
                                                       "in a decoder LLM, PyramidDrop).")
    merge_dropped: Literal["none", "fuse_one"] = Field("none", description="none: drop tokens; "
                                                       "fuse_one: fold them into one weighted token "
                                                       "(non-causal towers; causal ones drop).")
    token_layers: dict[str, list[int]] | None = Field(None, description="Blocks with a token site "
                                                      "per tower (default: every block; in a "
                                                      "decoder LLM, tower 'language': the "
                                                      "layers round(L·{1/4, 1/2, 3/4})).")
    min_heads_per_module: int = Field(1, ge=1, description="Heads every attention module keeps.")
    min_ffn_frac: float = Field(0.02, gt=0.0, le=1.0, description="Share of MLP channels kept at least.")
    max_stage_share: float = Field(0.34, gt=0.0, le=1.0, description="Share of a parameter "
                                   "mode's remaining prunable FLOPs one stage may remove: a small "
                                   "tower is cut over several stages, so each is priced before the "
                                   "next (1: no cap).")
    token_stage_share: float = Field(1.0, ge=0.1, le=1.0, description="A token stage aims at "
                                     "min(quantum, this share × what its mode can still remove, "
                                     "every droppable token of its tower dropped). 1: a mode with "
                                     "under a quantum left drops all of it in one unpriced jump, "
                                     "then retires (a caption's tokens are a few percent of the "
                                     "FLOPs, so one stage can empty the text tower). Below 1 the "
                                     "mode's last stages shrink geometrically, each priced before "
                                     "the next, until under 5% of a quantum is left; `retire_below` "
                                     "ends that tail of small, noisily priced stages sooner.")
    param_quantum: float | None = Field(None, gt=0.0, le=1.0, description="Share of the dense "
                                        "model's parameters one parameter stage may remove at "
                                        "most, besides the FLOPs quantum (None: FLOPs only). Once a "
                                        "tower's tokens are mostly dropped its units cost little "
                                        "FLOPs each, and one FLOPs quantum could take most of them.")
    refit_tokens: bool = Field(True, description="When even one parameter unit of a stage "
                               "makes a token-pruned tower drop more tokens than the stage's "
                               "quantum allows (a head removed reshapes the attention that scores "
                               "tokens), lower the θ of that tower's token mode during the stage "
                               "so the stage removes one quantum (off: the stage removes what the "
                               "unit makes it remove, several quanta at times).")
    retire_below: float = Field(0.0, ge=0.0, lt=1.0, description="Retire a mode once its next "
                                "stage would remove less than this share of a quantum (0: only "
                                "when it can remove nothing). A tower whose tokens are mostly "
                                "dropped has units that cost almost no FLOPs; their stages are "
                                "priced by a quality change over a tiny FLOPs change, mostly "
                                "noise, which MPS then chases.")
    min_token_frac: float | dict[TokenMode, float] = Field(
        DEFAULT_MIN_TOKEN_FRAC, description="Share of a site's candidate tokens always kept: one share for every "
        "token mode, or one per mode ({vision_tokens: 0.05, language_tokens: 0.5}; a mode not "
        "named keeps 0.05). A caption has a dozen candidates where an image has 64, so a floor "
        "on language tokens keeps MPS from emptying the text tower when each stage looks cheap.")
    token_score: TokenScore | dict[TokenMode, TokenScore] = Field(
        "attention", description="What ranks a token mode's candidates at its sites: "
        "'attention', the attention they receive, head-masked (CIT, the paper); 'distinct', 1 − "
        "their mean cosine similarity to the tower's other tokens, measured at the first site "
        "that drops (every token still there: later, the last background tokens would be the "
        "unusual ones) and carried to the later sites, which cut the survivors again at θ. One "
        "score for every token mode, or one per mode ({vision_tokens: distinct}; a mode not "
        "named uses attention). On MiniVL the patches objects touch get an AUC of 0.87-0.90 by "
        "distinctiveness against 0.61-0.74 by attention received, and a single site after the "
        "ViT's first block (token_layers {vision: [0]}) keeps the most accuracy per FLOP "
        "(benchmarks/token_localization.py, BENCHMARKS.md). CIP still weighs parameters by the "
        "attention score. A decoder LLM's sites rank by attention only.")
    score_norm: Literal["zscore_per_kind", "none"] = Field("zscore_per_kind", description="How head "
                                                           "and channel scores are made comparable.")
    cost_metric: Literal["val_metric", "val_loss"] = Field("val_metric", description="Quality Q "
                                                           "of a stage: the headline validation "
                                                           "metric or −100 × validation loss.")
    cost_at: Literal["stage_end", "paired", "plan", "lookahead"] = Field(
        "stage_end", description="When a stage's quality loss is measured: 'stage_end', after its "
        "K training steps (Eq. 3); 'paired', after them too, but against the same weights with "
        "the stage's own cut put back (its units at 1, θ at its old value) instead of the quality "
        "the stage started from, so the training that goes on during it (an undertrained model "
        "improving) is not credited to the stage (one more validation pass per stage); 'plan', "
        "with the planned units at 0 or θ at its new value "
        "before any training, so a stage is not credited with training that continues (recovery "
        "from the stage before, an undertrained model improving); 'lookahead', every active "
        "mode's plan priced that way before the mode is chosen, so MPS compares this stage's "
        "prices instead of past ones (one more validation pass per mode per stage).")
    refuse_dear_plans: bool = Field(False, description="Price every active mode's plan before "
                                    "each choice, as cost_at 'lookahead' does, only to refuse the "
                                    "dear ones (lookahead_margin); the choice among the rest "
                                    "follows cost_at. Implied by cost_at 'lookahead'.")
    lookahead_margin: float = Field(5.0, ge=0.0, description="With cost_at 'lookahead' or "
                                    "refuse_dear_plans: a plan expected to lose more than this "
                                    "much quality Q (metric points, or 100 × validation loss) per "
                                    "quantum beyond the cheapest plan is refused, by exploration "
                                    "too. One head removed from a token-pruned text tower can "
                                    "cost more than every other mode's stage together.")
    lookahead_calibration: bool = Field(
        False, description="With cost_at 'lookahead': each plan's price is corrected by its "
        "mode's mean gap between the stage-end cost (Eq. 3, after the K training steps) and the "
        "plan's price over the mode's last three stages, and the history holds stage-end costs. "
        "A plan's damage before training overstates some modes' real cost many times "
        "(parameters recover during the stage, dropped tokens do not), so uncorrected prices "
        "pick tokens almost only. Each mode not refused runs one stage first.")
    rollback_drop: float | None = Field(None, gt=0.0, lt=1.0, description="Undo a stage that "
                                        "loses more than this share of the validation quality Q "
                                        "it started from (of the metric, or of the validation "
                                        "loss it adds to): weights, optimizer state, masks and "
                                        "thresholds go back to the stage's start. An undone "
                                        "parameter stage's units are kept from then on (the "
                                        "mode's next plan takes others, so its cost is not "
                                        "recorded); an undone token stage's cost goes into its "
                                        "mode's history and the mode waits `rollback_bar` stages. "
                                        "One text head or a text-token stage can take a model to "
                                        "chance in K steps, and Eq. 3 then credits the next mode "
                                        "with whatever recovery there is (None: never undo).")
    rollback_bar: int = Field(3, ge=1, description="Accepted stages a token mode waits after one "
                              "of its stages was undone. When every mode left waits, the next "
                              "stage runs unguarded rather than stop short of the target.")
    v_sub: int = Field(1000, ge=8, description="Validation examples that price each stage.")
    probe_set: int = Field(256, ge=8, description="Training examples that size each stage's quantum.")
    flops_scope: Literal["model", "decoder"] = Field("model", description="What `target` and "
                                                     "`stage_quantum` are shares of: the whole "
                                                     "model's FLOPs, or a decoder LLM's prefill "
                                                     "FLOPs (LLaVA-style models, where CoMP prunes "
                                                     "the decoder only).")
    tol: float = Field(0.005, ge=0.0, description="Stop within this share of the dense FLOPs of the target.")
    train_split: FitSplit = Field("train", description="Split trained on.")
    val_split: FitSplit = Field("validation", description="Split that prices stages (never test).")

    @model_validator(mode="after")
    def _calibration_needs_lookahead(self):
        if self.lookahead_calibration and self.cost_at != "lookahead":
            raise ValueError(f"lookahead_calibration corrects lookahead prices: it needs cost_at "
                             f"'lookahead', not '{self.cost_at}'")
        return self

    @field_validator("min_token_frac")
    @classmethod
    def _shares(cls, v):
        for share in (v.values() if isinstance(v, dict) else [v]):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"a share of tokens lies in [0, 1], not {share}")
        return v

    def score_of(self, mode: str) -> str:
        """The `token_score` of token mode `mode`."""
        return _of_mode(self.token_score, mode, "attention")

    def token_floor(self, mode: str) -> float:
        """The `min_token_frac` of token mode `mode`."""
        return _of_mode(self.min_token_frac, mode, DEFAULT_MIN_TOKEN_FRAC)


def _of_mode(setting, mode: str, default):
    """A per-token-mode setting's value for `mode`: the one value, or the mode's entry of the
    dict (`default` for a mode it does not name)."""
    return setting.get(mode, default) if isinstance(setting, dict) else setting


class Comp(Pass):
    """CoMP: prune tokens and heads/channels jointly to a FLOPs target (CIM scores, MPS stages)."""

    name = "comp"
    Params = CompParams
    calibrates = True
    requires = frozenset({"model", "graph", "data"})
    provides = frozenset({"pruned.structured", "pruned.tokens"})
    excludes = frozenset({"quantized"})

    def run(self, ctx: Context) -> None:
        p = self.params

        teacher = dense_teacher(ctx, p.kd_weight, "comp")

        def trainer(total: int) -> Trainer:
            return Trainer(ctx.adapter, ctx.task, total, p.lr, p.weight_decay, teacher=teacher,
                           kd_weight=p.kd_weight, kd_temperature=p.kd_temperature)

        search = CompSearch(ctx, p, log=ctx.log)
        result = search.run(trainer)
        if result["final_flops"] > result["target"] + p.tol:
            ctx.log(f"comp: stopped at {result['final_flops']:.3f} of the dense FLOPs, "
                             f"above the target {result['target']:.3f}")
        ctx.state.setdefault("comp", []).append({"params": p.model_dump(), **result})
        if ctx.run_dir is not None and is_main():
            n = len(ctx.state["comp"])
            name = "mps_modes.png" if n == 1 else f"mps_modes_{n}.png"
            plot_trajectory(result, ctx.run_dir / "plots" / name, ctx.task)
