"""CIP: token-weighted structured Wanda (comp.md §3.2, §12.4)."""
import torch

from mmprune.comp.cim import CIPStatistics
from mmprune.graph import trace
from mmprune.models.clip import CLIPAdapter
from mmprune.runtime.runtime import TokenRuntime


def _wanda(adapter, batch):
    """Structured Wanda from forward hooks on the unmanaged model: mean|W_:,i| · ‖X_:,i‖₂."""
    sums, handles = {}, []
    for tower, root in (("vision", adapter.model.vision_model), ("language", adapter.model.text_model)):
        for i, layer in enumerate(root.encoder.layers):
            for gid, lin in ((f"{tower}.{i}.attn", layer.self_attn.out_proj), (f"{tower}.{i}.mlp", layer.mlp.fc2)):
                def hook(mod, args, gid=gid):
                    x = args[0]
                    if gid.startswith("language"):   # real tokens only
                        x = x * batch["attention_mask"][..., None]
                    sums[gid] = sums.get(gid, 0) + x.pow(2).sum(dim=(0, 1)).double()
                handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        adapter.model(**batch)
    for h in handles:
        h.remove()
    out = {}
    for gid, s in sums.items():
        tower, i, kind = gid.split(".")
        root = adapter.model.vision_model if tower == "vision" else adapter.model.text_model
        layer = root.encoder.layers[int(i)]
        lin = layer.self_attn.out_proj if kind == "attn" else layer.mlp.fc2
        score = lin.weight.abs().double().mean(dim=0) * s.sqrt()
        out[gid] = score.view(layer.self_attn.num_heads, -1).mean(dim=1) if kind == "attn" else score
    return out


def test_plain_cip_ranks_like_structured_wanda():
    adapter = CLIPAdapter(CLIPAdapter.tiny_model(0))
    graph = trace(adapter)
    batch = adapter.example_inputs(4)
    batch["attention_mask"][2, 6:] = 0
    batch["input_ids"][2, 5] = 3
    expected = _wanda(adapter, batch)
    rt = TokenRuntime.attach(graph)
    stats = CIPStatistics(graph, token_weighted=False)
    rt.set_observer(stats)
    with torch.no_grad():
        adapter.model(**batch)
    got = stats.scores()
    assert set(got) == set(expected)
    for gid in got:
        assert torch.equal(got[gid].argsort(), expected[gid].float().argsort()), gid
        # G is averaged over the 4 examples: sqrt(G / 4) = ‖X‖ / 2
        torch.testing.assert_close(got[gid].double(), expected[gid] / 2, rtol=1e-4, atol=1e-9)


def test_uniform_token_weights_reduce_to_wanda():
    """ω = 1/N with no global token: CIP = Wanda / sqrt(N), the same ranking (§12.4)."""
    adapter = CLIPAdapter(CLIPAdapter.tiny_model(1))
    graph = trace(adapter)
    stats = CIPStatistics(graph, token_weighted=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 64, generator=g)
    s = torch.ones(3, 10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    stats.attention("vision", 0, x, s, valid, torch.zeros_like(valid))
    w = adapter.model.vision_model.encoder.layers[0].self_attn.out_proj.weight
    wanda = (w.abs().double().mean(dim=0) * x.pow(2).sum(dim=(0, 1)).double().sqrt()).view(4, 16).mean(dim=1)
    cip = stats.scores()["vision.0.attn"].double()
    torch.testing.assert_close(cip, wanda / (10 ** 0.5 * 3 ** 0.5), rtol=1e-5, atol=0)


def test_token_weights_change_the_ranking_and_zeroed_heads_score_zero():
    adapter = CLIPAdapter(CLIPAdapter.tiny_model(2))
    graph = trace(adapter)
    batch = adapter.example_inputs(4)
    rt = TokenRuntime.attach(graph)
    mask = torch.ones(4)
    mask[1] = 0
    rt.set_mask("vision.1.attn", mask)
    plain, weighted = CIPStatistics(graph, token_weighted=False), CIPStatistics(graph)
    for stats in (plain, weighted):
        rt.set_observer(stats)
        with torch.no_grad():
            adapter.model(**batch)
    assert weighted.scores()["vision.1.attn"][1] == 0 and plain.scores()["vision.1.attn"][1] == 0
    differs = [gid for gid in plain.sums
               if not torch.allclose(plain.scores()[gid] / plain.scores()[gid].sum(),
                                     weighted.scores()[gid] / weighted.scores()[gid].sum())]
    assert differs
