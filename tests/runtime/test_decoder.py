"""Image-token pruning inside the LLaVA decoder: probe, keep-all identity, protected tokens,
cached generation against recomputation, positions, and the training path."""
from __future__ import annotations

import math

import pytest
import torch

from mmprune.data.batching import collate_rows
from mmprune.data.minivl.source import MiniVLParams, load_task
from mmprune.graph import trace
from mmprune.models.llava import LlavaAdapter
from mmprune.runtime.decoder import DecoderSite, DecoderTokenPruner, pdrop_sites
from mmprune.runtime.probe import attention_probe

SIZES = dict(train_size=16, validation_size=8, test_size=8)


def make(seed: int = 0) -> LlavaAdapter:
    model = LlavaAdapter.tiny_model(seed, {"vision_config": {"image_size": 32},
                                           "text_config": {"num_hidden_layers": 4}})
    return LlavaAdapter(model, *LlavaAdapter.default_processors(model))


def batch(a: LlavaAdapter, n: int = 4) -> dict[str, torch.Tensor]:
    rows = load_task(MiniVLParams(task="instruct", **SIZES))["train"]
    return collate_rows(a, rows, list(range(n)))


def pruner(a: LlavaAdapter, sites, **kw) -> DecoderTokenPruner:
    p = DecoderTokenPruner(a.model, sites, a.model.config.image_token_id, a.prompt_end, **kw)
    p.install()
    return p


def _eager_rows(layer, x, pos_emb, allowed, query):
    attn = layer.self_attn
    old = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        mask = torch.zeros(allowed.shape[0], 1, x.shape[1], x.shape[1])
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        mask = mask.masked_fill(~(causal & allowed[:, None, :])[:, None], torch.finfo(x.dtype).min)
        _, weights = attn(layer.input_layernorm(x), position_embeddings=pos_emb, attention_mask=mask)
    finally:
        attn.config._attn_implementation = old
    return weights[torch.arange(x.shape[0]), :, query]


@pytest.mark.parametrize("kept", [None, [0, 1, 2], [1, 3]])
def test_probe_equals_eager_attention_on_the_probed_rows(kept):
    """Grouped-query (2 query heads per KV head), uneven groups after removal, and even again."""
    a = make()
    lm = a.model.model.language_model
    layer = lm.layers[1]
    if kept is not None:
        from mmprune.graph import remove_units
        g = trace(a)
        remove_units(g, g.groups["language.1.attn"], [h for h in range(4) if h not in kept])
    torch.manual_seed(0)
    x = torch.randn(3, 12, 64)
    pos = torch.arange(12)[None].expand(3, -1)
    pos_emb = lm.rotary_emb(x, position_ids=pos)
    allowed = torch.ones(3, 12, dtype=torch.bool)
    allowed[1, :2] = False                       # left padding
    query = torch.tensor([11, 7, 4])
    causal = torch.arange(12)[None] <= query[:, None]
    probe = attention_probe(layer, x, query, pos_emb, allowed & causal)
    torch.testing.assert_close(probe, _eager_rows(layer, x, pos_emb, allowed, query).float(),
                               atol=1e-6, rtol=1e-5)


def test_keep_all_sites_reproduce_the_dense_logits_exactly():
    a = make()
    b = batch(a)
    with torch.no_grad():
        dense = a.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixel_values=b["pixel_values"]).logits
        p = pruner(a, [DecoderSite(1, 1.0), DecoderSite(2, 1.0)])
        kept = a.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits
    assert torch.equal(dense, kept)
    p.uninstall()
    assert "forward" not in vars(a.model.model.language_model)


def test_sites_drop_image_tokens_only_and_never_the_query():
    a = make()
    b = batch(a)
    p = pruner(a, pdrop_sites(4, 0.5))
    assert [(s.layer, s.keep) for s in p.sites] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    with torch.no_grad():
        a.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"])
    valid = b["attention_mask"].sum(1)
    n_image = int((b["input_ids"][0] == a.model.config.image_token_id).sum())
    for layer, keep in [(0, 1.0), (1, 0.5), (2, 0.25), (3, 0.125)]:
        assert torch.equal(p.last_counts[layer], valid - n_image + math.ceil(keep * n_image)), layer
    image = b["input_ids"] == a.model.config.image_token_id
    query = a.prompt_end(b["input_ids"], b["attention_mask"])
    for stage in p._stages:
        for i in range(len(valid)):
            held = set(stage.index[i][stage.valid[i]].tolist())
            protected = set(torch.nonzero(~image[i] & b["attention_mask"][i].bool()).flatten().tolist())
            assert protected <= held and int(query[i]) in held
            assert len(held - protected) < n_image


def test_prompt_end_is_the_answer_cue_with_or_without_an_answer_after_it():
    a = make()
    b = batch(a)
    full = a.prompt_end(b["input_ids"], b["attention_mask"])
    # teacher-forced sequences (prompt + answer) and right-aligned prompts agree on the token
    prompt = a.prompt_end(b["prompt_ids"], b["prompt_mask"])
    shift = b["prompt_ids"].shape[1] - b["prompt_mask"].sum(1)
    assert torch.equal(full, prompt - shift)
    assert torch.equal(full + 1, (b["labels"] != -100).float().argmax(1))


def _assert_cached_generation_equals_recomputation(a: LlavaAdapter, b: dict, steps: int,
                                                   same_tokens: bool = True) -> None:
    """Greedy generation of `steps` tokens with the KV cache gives the scores (and, with
    `same_tokens`, the tokens) of recomputing the whole sequence at every step."""
    kw = dict(input_ids=b["prompt_ids"], attention_mask=b["prompt_mask"],
              pixel_values=b["pixel_values"], do_sample=False, max_new_tokens=steps,
              min_new_tokens=steps, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = a.model.generate(**kw, use_cache=True)
        recomputed = a.model.generate(**kw, use_cache=False)
    if same_tokens:
        assert torch.equal(cached.sequences, recomputed.sequences)
    # the scores of every step, not only the argmax: positions and masks of every stage agree
    for c, r in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(c, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["renumber", "keep_original"])
@pytest.mark.parametrize("probe", ["current", "previous"])
def test_cached_generation_equals_recomputation(position, probe):
    a = make(seed=1)
    b = batch(a)
    p = pruner(a, pdrop_sites(4, 0.5), position=position, probe=probe)
    _assert_cached_generation_equals_recomputation(a, b, 6)
    assert (p.last_counts[3] < p.last_counts[0]).all()   # the prefills did drop tokens


def test_positions_policies_differ_and_pruning_changes_the_answer_logits():
    a = make(seed=2)
    b = batch(a)
    args = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"])
    with torch.no_grad():
        dense = a.model(**args).logits
        p = pruner(a, pdrop_sites(4, 0.5), position="renumber")
        renumbered = a.model(**args).logits
        p.position = "keep_original"
        original = a.model(**args).logits
    answer = b["labels"] != -100
    assert not torch.allclose(dense[answer], renumbered[answer])
    assert not torch.allclose(renumbered[answer], original[answer])
    # dropped positions come back as zeros before the LM head: their logits are the head's bias
    image = b["input_ids"] == a.model.config.image_token_id
    assert torch.isfinite(renumbered).all() and image.any()


def test_training_with_sites_backpropagates_the_answer_loss():
    a = make()
    b = batch(a)
    pruner(a, [DecoderSite(2, 0.25)])
    a.model.train()
    loss = a.task_loss(b, "instruct")
    loss.backward()
    assert torch.isfinite(loss)
    grad = a.model.model.language_model.layers[3].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_pdrop_schedule_on_shallow_decoders():
    assert [(s.layer, s.keep) for s in pdrop_sites(32, 0.5)] == [(8, 0.5), (16, 0.25), (24, 0.125)]
    assert [(s.layer, s.keep) for s in pdrop_sites(3, 0.5)] == [(1, 0.5), (2, 0.25)]   # 2.25 and 1.5 meet
    assert [(s.layer, s.keep) for s in pdrop_sites(2, 0.5)] == [(1, 0.5)]


def test_ragged_drops_pad_the_batch_and_renumber_each_example():
    """Examples keeping different numbers of tokens: kept tokens first in their original order,
    the tail invalid, positions shifted by the tokens dropped before each one."""
    from mmprune.runtime.decoder import _Tokens

    a = make()
    p = DecoderTokenPruner(a.model, [DecoderSite(1, 0.5)], 0, a.prompt_end, position="renumber")
    n = 6
    t = _Tokens(torch.arange(2 * n, dtype=torch.float).view(2, n, 1), torch.arange(n).expand(2, n),
                torch.ones(2, n, dtype=torch.bool), torch.zeros(2, n, dtype=torch.bool),
                torch.zeros(2, n, dtype=torch.bool), torch.arange(n).expand(2, n),
                torch.zeros(2, dtype=torch.long))
    keep = torch.tensor([[1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    out = p._gather(t, keep)
    assert out.index.tolist()[1] == [0, 1, 2, 3, 5] and out.index.tolist()[0][:3] == [0, 2, 5]
    assert out.valid.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert out.pos.tolist()[0][:3] == [0, 1, 2] and out.pos.tolist()[1] == [0, 1, 2, 3, 4]
    assert out.offset.tolist() == [3, 1]
    assert out.x[1, :, 0].tolist() == [6.0, 7.0, 8.0, 9.0, 11.0]
    p.position = "keep_original"
    assert p._gather(t, keep).pos.tolist()[1] == [0, 1, 2, 3, 5]


def test_a_cache_the_prefill_did_not_fill_is_refused():
    from mmprune.errors import MMPruneError
    from mmprune.models.kv_cache import CACHE_KWARG

    a = make()
    b = batch(a, 2)
    pruner(a, pdrop_sites(4, 0.5))
    with torch.no_grad():
        out = a.model(input_ids=b["prompt_ids"], attention_mask=b["prompt_mask"],
                      pixel_values=b["pixel_values"], use_cache=True)
        cache = getattr(out, CACHE_KWARG)
        a.model(input_ids=b["prompt_ids"], attention_mask=b["prompt_mask"],
                pixel_values=b["pixel_values"], use_cache=True)      # another prefill
        step = torch.ones(2, 1, dtype=torch.long) * 5
        mask = torch.cat([b["prompt_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        with pytest.raises(MMPruneError, match="not filled by the last prefill"):
            a.model(input_ids=step, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})


def test_bad_sites_are_clear_errors():
    from mmprune.errors import MMPruneError
    a = make()
    with pytest.raises(MMPruneError, match="distinct layers in 1..3"):
        DecoderTokenPruner(a.model, [DecoderSite(0, 0.5)], 0, a.prompt_end)
    with pytest.raises(MMPruneError, match="share in"):
        DecoderTokenPruner(a.model, [DecoderSite(2, 0.0)], 0, a.prompt_end)


def test_pruned_prefill_flops_match_the_counter_plus_the_probe():
    """The cost model with each layer's real token count against torch's FLOP counter over
    pruned prefills; the counter also sees the probe (comp.md §6 leaves it out of the
    convention): per site a q row, keys for every token entering it, and one score row."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmprune.runtime.runtime import TokenRuntime

    a = make()
    a.model.set_attn_implementation("eager")   # torch does not count the CPU SDPA kernel
    g = trace(a)
    rt = TokenRuntime.attach(g)
    rt.set_decoder(pdrop_sites(4, 0.5))
    b = batch(a)
    cfg = a.model.config.text_config
    d, heads, kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    analytic = probe = 0.0
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for i in range(len(b["prompt_ids"])):   # one example at a time, at its own length
            n = int(b["prompt_mask"][i].sum())
            a.model(input_ids=b["prompt_ids"][i:i + 1, -n:], pixel_values=b["pixel_values"][i:i + 1],
                    logits_to_keep=1)
            vision = a.tokens_per_example(b)["vision"][i:i + 1]
            counts = {gid: vision for gid, grp in g.groups.items() if grp.tower == "vision"}
            counts.update(rt.counts())
            analytic += float(g.cost.flops_per_example(counts).sum())
            for site in rt.decoder.sites:
                entering = int(rt.decoder.last_counts[site.layer - 1][0])
                probe += 2 * cfg.hidden_size * heads * d + 2 * entering * cfg.hidden_size * kv * d \
                    + 2 * heads * entering * d
    assert rt.decoder.last_counts[3][0] < rt.decoder.last_counts[0][0]
    assert abs(analytic + probe - fc.get_total_flops()) / fc.get_total_flops() < 0.01


# ---- CoMP inside the decoder: soft masks, CIP statistics from the probe, θ sites

def test_decoder_masks_at_zero_equal_physical_removal():
    """Heads (grouped-query: one KV head loses one of its two query heads, another both) and
    SwiGLU channels masked to 0 on the o_proj / down_proj inputs give the logits of removal."""
    from mmprune.graph import remove_units
    from mmprune.runtime.runtime import TokenRuntime

    a = make(seed=3)
    b = batch(a)
    g = trace(a)
    rt = TokenRuntime.attach(g)
    rt.manage_decoder()
    heads, channels = [0, 2, 3], list(range(0, 256, 3))
    rt.set_mask("language.1.attn", torch.tensor([0.0, 1.0, 0.0, 0.0]))
    rt.set_mask("language.2.mlp", torch.tensor([0.0 if i in channels else 1.0 for i in range(256)]))
    args = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"])
    with torch.no_grad():
        masked = a.model(**args).logits
        rt.clear_masks()
        assert not torch.allclose(masked, a.model(**args).logits)
        rt.uninstall()
        remove_units(g, g.groups["language.1.attn"], heads)
        remove_units(g, g.groups["language.2.mlp"], channels)
        removed = a.model(**args).logits
    torch.testing.assert_close(masked, removed, atol=1e-5, rtol=1e-4)


def test_a_decoder_that_drops_nothing_leaves_the_runtime_inactive():
    """CoMP installs a site-less decoder pruner as the host of its masks: token counts then need
    no prefill and an export no token policy, until a site can drop something."""
    from mmprune.runtime.runtime import TokenRuntime

    rt = TokenRuntime.attach(trace(make()))
    d = rt.manage_decoder()
    assert not rt.active
    d.set_sites([DecoderSite(2, 1.0)])
    assert not rt.active
    d.theta["vision_tokens"] = 0.5
    assert rt.active
    d.theta["vision_tokens"] = 0.0
    d.set_sites([DecoderSite(2, 0.5)])
    assert rt.active


class _Recorder:
    def __init__(self):
        self.calls = []

    def attention(self, tower, layer, context, s, valid, global_):
        self.calls.append(("attention", layer, context.shape, s, valid, global_))

    def mlp(self, tower, layer, hidden, s, valid, global_):
        self.calls.append(("mlp", layer, hidden.shape, s, valid, global_))


def test_the_observer_sees_every_layer_with_probe_scores_and_no_sink():
    """comp.md §3.2-3.3 in the decoder: heads of layer l and the MLP of l−1 weighted by layer l's
    probe, the last MLP by its own layer; the sink (first real token) weighs 0; tokens after the
    probe query get no attention from it. A site in between changes the token count."""
    from mmprune.runtime.runtime import TokenRuntime

    a = make()
    b = batch(a)
    rt = TokenRuntime.attach(trace(a))
    d = rt.manage_decoder()
    d.set_sites([DecoderSite(2, 0.5)])
    rec = _Recorder()
    rt.set_observer(rec)
    with torch.no_grad():
        a.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"])
    order = [(kind, layer) for kind, layer, *_ in rec.calls]
    assert order == [("attention", 0), ("mlp", 0), ("attention", 1), ("mlp", 1), ("attention", 2),
                     ("mlp", 2), ("attention", 3), ("mlp", 3)]
    query = a.prompt_end(b["input_ids"], b["attention_mask"])
    for kind, layer, shape, s, valid, global_ in rec.calls:
        assert shape[1] == s.shape[1] == int(d.last_counts[layer].max())
        assert shape[2] == (64 if kind == "attention" else 256)
        assert not valid[:, 0].any() and not global_.any()     # right padding: the sink is 0
        if layer < 2:      # original positions: nothing after the query receives its attention
            after = torch.arange(s.shape[1])[None] > query[:, None]
            assert (s[after] == 0).all() and (s.sum(1) > 0).all()
    # MLP 1 ran before the site, attention 2 after it: fewer tokens
    assert rec.calls[3][2][1] > rec.calls[4][2][1]


def test_theta_sites_drop_instruction_tokens_and_keep_the_protected_ones():
    """`language_tokens` θ drops instruction text down to its floor; image tokens, BOS, the
    answer cue and the answer are kept; cached generation equals recomputation."""
    from mmprune.runtime.runtime import TokenRuntime

    a = make(seed=1)
    b = batch(a)
    rt = TokenRuntime.attach(trace(a))
    rt.set_decoder([DecoderSite(1, 1.0), DecoderSite(3, 1.0)], theta={"language_tokens": 50.0},
                   min_keep_frac=0.25)
    d = rt.decoder
    instr = a.instruction_tokens(b["input_ids"], b["attention_mask"])
    image = b["input_ids"] == a.model.config.image_token_id
    assert instr.any() and not (instr & image).any()
    with torch.no_grad():
        a.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                pixel_values=b["pixel_values"])
    floor = torch.ceil(instr.sum(1) * 0.25 - 1e-9).long()
    held = d._stages[-1]
    for i in range(len(b["input_ids"])):
        kept = set(held.index[i][held.valid[i]].tolist())
        real = set(torch.nonzero(b["attention_mask"][i]).flatten().tolist())
        protected = real - set(torch.nonzero(instr[i]).flatten().tolist())
        assert protected <= kept
        assert len(kept - protected) == int(floor[i])     # θ above every score: the floor is left
    _assert_cached_generation_equals_recomputation(a, b, 4, same_tokens=False)


def test_decoder_sites_refuse_a_score_other_than_attention():
    from mmprune.errors import MMPruneError
    from mmprune.runtime.runtime import TokenRuntime

    a = make()
    rt = TokenRuntime.attach(trace(a))
    rt.manage_decoder()
    with pytest.raises(MMPruneError, match="attention only"):
        rt.enable_token_mode("vision_tokens", 0.05, score="distinct")
    rt.enable_token_mode("vision_tokens", 0.05)     # the default still enables the sites
    assert rt.decoder.sites
