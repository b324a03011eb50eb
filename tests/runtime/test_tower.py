"""The token-pruning runtime on CLIP: identity, mask = slice, batch invariance, FLOPs, CIT."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmprune.graph import remove_units, trace
from mmprune.models.clip import CLIPAdapter
from mmprune.runtime import SiteControl
from mmprune.runtime import tokens as T
from mmprune.runtime.runtime import TokenRuntime, runtime_of
from tests.runtime.helpers import mask_and_slice


def _clip(seed=0, **over):
    model = CLIPAdapter.tiny_model(seed, over or None)
    adapter = CLIPAdapter(model)
    return adapter, trace(adapter)


def _batch(adapter, n=3, pad=True):
    b = adapter.example_inputs(n)
    if pad:  # a shorter second caption: EOT at 4, padding after it
        b["input_ids"][1, 4], b["input_ids"][1, 5:] = 3, 0
        b["attention_mask"][1, 5:] = 0
    return b


@torch.no_grad()
def test_identity_without_pruning():
    adapter, graph = _clip()
    batch = _batch(adapter)
    dense = adapter.model(**batch).logits_per_image
    rt = TokenRuntime.attach(graph)
    managed = adapter.model(**batch).logits_per_image
    assert (managed - dense).abs().max() < 1e-5          # explicit vs SDPA attention
    rt.set_sites("vision", SiteControl(theta=0.0))
    rt.set_sites("language", SiteControl(theta=0.0))
    assert torch.equal(adapter.model(**batch).logits_per_image, managed)  # θ = 0 keeps every token
    rt.uninstall()
    assert runtime_of(adapter.model) is None
    assert torch.equal(adapter.model(**batch).logits_per_image, dense)


@torch.no_grad()
def test_zero_masks_equal_physical_removal():
    adapter, graph = _clip()
    batch = _batch(adapter)
    sliced_adapter = CLIPAdapter(copy.deepcopy(adapter.model))
    sliced = trace(sliced_adapter)
    drop = {"vision.0.attn": [1, 3], "language.1.attn": [0], "vision.1.mlp": list(range(0, 256, 3)),
            "language.0.mlp": [5, 6, 7]}
    mask_and_slice(graph, sliced, drop, theta=0.8)
    a = adapter.model(**batch)
    b = sliced_adapter.model(**batch)
    assert sliced_adapter.model.vision_model.encoder.layers[0].self_attn.num_heads == 2
    assert (a.logits_per_image - b.logits_per_image).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("merge, score", [(False, "attention"), (True, "attention"),
                                          (False, "distinct"), (True, "distinct")])
def test_batch_invariance_under_pad_mask(merge, score):
    adapter, graph = _clip()
    batch = _batch(adapter, 3)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0, merge=merge, score=score))
    rt.set_sites("language", SiteControl(theta=1.0, score=score))
    out = adapter.model(**batch)
    counts = rt.counts()
    assert len({float(c) for c in counts["vision.1.attn"]}) > 1, "examples should keep different counts"
    for i in range(3):
        one = adapter.model(**{k: v[i:i + 1] for k, v in batch.items()})
        assert (one.image_embeds - out.image_embeds[i:i + 1]).abs().max() < 1e-5
        assert (one.text_embeds - out.text_embeds[i:i + 1]).abs().max() < 1e-5
        assert {g: float(c[0]) for g, c in rt.counts().items()} == {g: float(c[i]) for g, c in counts.items()}


@torch.no_grad()
def test_analytic_flops_match_the_flop_counter():
    adapter, graph = _clip()
    batch = _batch(adapter, 1, pad=False)
    rt = TokenRuntime.attach(graph)
    remove_units(graph, graph.groups["vision.1.attn"], [0])
    remove_units(graph, graph.groups["language.0.mlp"], list(range(100)))
    for theta in (0.0, 0.7, 1.5):
        for tower in ("vision", "language"):
            rt.set_sites(tower, SiteControl(theta=theta))
        with FlopCounterMode(display=False) as fc:
            adapter.forward(batch)
        est = float(graph.cost.flops_per_example(rt.counts())[0])
        assert est == pytest.approx(fc.get_total_flops(), rel=0.02), theta


def _dense_vision_attention(adapter, px, layer: int):
    """The ViT's post-softmax attention [B, H, N, N] at `layer`, and the valid / CLS marks [B, N]."""
    adapter.model.config.vision_config._attn_implementation = "eager"
    att = adapter.model.vision_model(pixel_values=px, output_attentions=True).attentions[layer]
    b, _, n, _ = att.shape
    valid = torch.ones(b, n, dtype=torch.bool)
    cls = torch.zeros_like(valid)
    cls[:, 0] = True
    return att, valid, cls


@torch.no_grad()
def test_cit_equals_plain_attention_received_with_all_ones_mask():
    adapter, _ = _clip()
    att, valid, cls = _dense_vision_attention(adapter, adapter.example_inputs(2)["pixel_values"], 0)
    h = att.shape[1]
    plain = att[:, :, 1:, :].amax(dim=1).sum(dim=1)     # queries: all but CLS; keys: all
    plain[:, 0] = 0
    ones = T.attention_received(att, valid, cls, torch.ones(h))
    assert torch.allclose(ones, plain, atol=1e-6)
    off = torch.ones(h)
    off[2] = 0
    masked = T.attention_received(att, valid, cls, off)
    others = att[:, [0, 1, 3], 1:, :].amax(dim=1).sum(dim=1)
    others[:, 0] = 0
    assert torch.allclose(masked, others, atol=1e-6)   # the masked head contributes nothing


def test_keep_rule_protects_and_floors():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        b, n = 4, 20
        valid = torch.rand(b, n, generator=g) > 0.2
        valid[:, 0] = True
        protected = (torch.rand(b, n, generator=g) > 0.8) & valid
        protected[:, 0] = True
        cand = valid & ~protected
        s = T.normalise(torch.rand(b, n, generator=g), cand)
        sums = s.sum(dim=1)[cand.any(dim=1)]
        assert torch.allclose(sums, torch.ones_like(sums))
        floor = T.min_keep_count(cand.sum(dim=1), 0.3)
        keep = T.keep_mask(s, cand, protected, float(torch.rand(1, generator=g) * 3), floor)
        assert (keep[protected]).all()
        assert ((keep & cand).sum(dim=1) >= torch.minimum(floor, cand.sum(dim=1))).all()
        assert torch.equal(T.keep_mask(s, cand, protected, 0.0, floor), cand | protected)


@torch.no_grad()
@pytest.mark.parametrize("score", ["attention", "distinct"])
def test_export_and_load_restore_token_pruning(tmp_path, score):
    from mmprune.saved import load_bundle, save

    adapter, graph = _clip()
    batch = _batch(adapter)
    rt = TokenRuntime.attach(graph)
    remove_units(graph, graph.groups["vision.0.attn"], [2])
    rt.set_sites("vision", SiteControl(theta=1.2, min_keep_frac=0.1, merge=True, score=score),
                 layers=[1])
    rt.set_sites("language", SiteControl(theta=0.9))
    before = adapter.model(**batch).logits_per_image
    save(tmp_path / "m", adapter, graph)
    bundle = load_bundle(tmp_path / "m")
    assert bundle.spec["token_policy"]["towers"]["vision"]["layers"] == [1]
    assert bundle.spec["token_policy"]["towers"]["vision"]["score"] == score
    after = bundle.model(**batch).logits_per_image
    assert torch.equal(before, after)
    assert runtime_of(bundle.model).counts()["vision.1.mlp"].max() < 17


@torch.no_grad()
def test_idle_towers_go_back_to_their_own_forward_and_come_back():
    adapter, graph = _clip()
    batch = _batch(adapter)
    dense = adapter.model(**batch).logits_per_image
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0))
    rt.release_idle()
    assert set(rt.towers) == {"vision"}
    assert "forward" not in vars(adapter.model.text_model.encoder)
    assert "forward" in vars(adapter.model.vision_model.encoder)
    again = TokenRuntime.attach(graph)
    assert again is rt and set(rt.towers) == {"vision", "language"}
    rt.set_sites("vision", None)
    rt.release_idle()
    assert runtime_of(adapter.model) is None
    assert torch.equal(adapter.model(**batch).logits_per_image, dense)


@torch.no_grad()
def test_towers_called_with_positional_arguments_are_read_by_name():
    adapter, graph = _clip()
    batch = _batch(adapter)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("language", SiteControl(theta=1.0))
    by_name = adapter.model.text_model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
    positional = adapter.model.text_model(batch["input_ids"], batch["attention_mask"]).pooler_output
    assert torch.equal(by_name, positional)


@torch.no_grad()
def test_sites_report_the_original_positions_of_the_tokens_they_keep():
    adapter, graph = _clip()
    px = adapter.example_inputs(3)["pixel_values"]
    att, valid, cls = _dense_vision_attention(adapter, px, 1)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0), layers=[1])
    adapter.model.vision_model(pixel_values=px)
    tower = rt.towers["vision"]
    assert set(tower.last_kept) == {1}
    position, real = tower.last_kept[1]
    b, n = valid.shape
    s = T.normalise(T.attention_received(att, valid, cls), ~cls)
    # the keep rule with θ = 1; its floor (5% of 16 candidates: the top one) is kept by θ anyway
    expected = (n - 1) * s >= 1.0
    expected[:, 0] = True                # CLS is protected
    for i in range(b):
        kept = set(position[i][real[i]].tolist())
        assert kept == set(expected[i].nonzero().flatten().tolist())
        assert 0 in kept and len(kept) < n


def test_distinctiveness_ranks_the_odd_token_first_and_ignores_what_is_not_compared():
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 7, 8
    background = torch.randn(d, generator=g)
    x = background + 0.05 * torch.randn(b, n, d, generator=g)
    x[:, 3] = torch.randn(d, generator=g)                 # one token unlike the rest
    reference = torch.ones(b, n, dtype=torch.bool)
    reference[:, 0] = False                               # a global token is not compared with
    reference[1, 6] = False                               # nor padding
    s = T.distinctiveness(x, reference)
    assert (s.argmax(dim=1) == 3).all()
    # against a plain loop: 1 - mean cosine similarity to the other reference tokens
    for i in range(b):
        for j in range(n):
            others = [k for k in range(n) if k != j and reference[i, k]]
            cos = torch.nn.functional.cosine_similarity(x[i, j][None], x[i, others])
            assert s[i, j] == pytest.approx(float(1 - cos.mean()), abs=1e-5)
    # what is outside the reference does not move the others' scores
    y = x.clone()
    y[1, 6], y[:, 0] = 100 * torch.randn(d, generator=g), -y[:, 0]
    moved = T.distinctiveness(y, reference)
    assert torch.allclose(moved[:, 1:6], s[:, 1:6], atol=1e-6)


@torch.no_grad()
def test_distinct_sites_rank_by_the_first_site_scores_carried_forward(monkeypatch):
    """The distinctiveness is measured once per forward, at the first dropping site, among every
    token; a later site keeps the survivors whose carried score clears θ among them."""
    adapter, graph = _clip()
    px = adapter.example_inputs(3)["pixel_values"]
    measured = []
    real = T.distinctiveness

    def recording(x, reference):
        measured.append(real(x, reference))
        return measured[-1]

    monkeypatch.setattr(T, "distinctiveness", recording)
    rt = TokenRuntime.attach(graph)
    rt.set_sites("vision", SiteControl(theta=1.0, min_keep_frac=0.05, score="distinct"), layers=[0, 1])
    adapter.model.vision_model(pixel_values=px)
    assert len(measured) == 1
    first = measured[0]
    tower = rt.towers["vision"]
    (p0, v0), (p1, v1) = tower.last_kept[0], tower.last_kept[1]
    for i in range(px.shape[0]):
        after0 = [int(t) for t in p0[i][v0[i]] if t != 0]
        after1 = {int(t) for t in p1[i][v1[i]] if t != 0}
        s = first[i, after0]
        expected = {t for t, si in zip(after0, s) if len(after0) * si / s.sum() >= 1.0}
        assert after1 == expected and after1 < set(after0)
        # site 0 kept the tokens above the mean distinctiveness of all candidates
        cand = first[i, 1:]
        assert set(after0) == {t + 1 for t in range(len(cand)) if len(cand) * cand[t] / cand.sum() >= 1.0}


def test_a_saved_policy_without_a_score_ranks_by_attention():
    """Exports of format 2 and before have no score: their sites rank by attention, as then."""
    adapter, graph = _clip()
    rt = TokenRuntime.attach(graph)
    rt.apply_policy({"towers": {"vision": {"layers": [1], "theta": 1.0, "min_keep_frac": 0.05,
                                           "merge": False}}})
    assert rt.towers["vision"].controls[1].site.score == "attention"
    assert rt.policy()["towers"]["vision"]["score"] == "attention"


def test_an_unknown_token_score_is_a_clear_error():
    from mmprune.errors import MMPruneError

    adapter, graph = _clip()
    rt = TokenRuntime.attach(graph)
    with pytest.raises(MMPruneError, match="attention, distinct"):
        rt.enable_token_mode("vision_tokens", 0.05, score="entropy")
    policy = {"towers": {"vision": {"layers": [1], "theta": 1.0, "min_keep_frac": 0.05,
                                    "merge": False, "score": "entropy"}}}
    with pytest.raises(MMPruneError, match="saved token policy of tower 'vision'"):
        rt.apply_policy(policy)


def test_token_sites_already_dropping_are_continued_and_other_sites_are_refused():
    """A tower whose sites already drop tokens (an earlier pass, a loaded export) keeps its θ when
    a token mode is enabled again with the same sites, and other sites are an error, not ignored."""
    from mmprune.errors import MMPruneError

    adapter, graph = _clip()
    rt = TokenRuntime.attach(graph)
    rt.enable_token_mode("vision_tokens", 0.05, layers=[0], score="distinct")
    rt.set_mode_theta("vision_tokens", 1.5)
    rt.enable_token_mode("vision_tokens", 0.05, layers=[0], score="distinct")
    assert rt.mode_theta("vision_tokens") == 1.5
    with pytest.raises(MMPruneError, match=r"score 'distinct' \(asked 'attention'\).*layers \[0\]"):
        rt.enable_token_mode("vision_tokens", 0.05, layers=[0, 1])
    with pytest.raises(MMPruneError, match=r"floor 0\.05 \(asked 0\.1\)"):
        rt.enable_token_mode("vision_tokens", 0.1, layers=[0], score="distinct")
    assert rt.mode_theta("vision_tokens") == 1.5 and rt.policy()["towers"]["vision"]["layers"] == [0]
    rt.enable_token_mode("vision_tokens", 0.05, layers=[0, 0, 99], score="distinct")   # as set_sites reads it
    # a causal tower only drops: asking it to merge again is what it was asked the first time
    assert adapter.managed_towers()[1].causal
    rt.enable_token_mode("language_tokens", 0.05, merge=True)
    rt.set_mode_theta("language_tokens", 0.5)
    rt.enable_token_mode("language_tokens", 0.05, merge=True)
    assert rt.mode_theta("language_tokens") == 0.5 and not rt.policy()["towers"]["language"]["merge"]
