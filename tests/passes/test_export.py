"""export -> mmprune.load rebuilds the same model from safetensors + mmprune.json, no pickles."""
from __future__ import annotations

import json

import pytest
import torch

import mmprune
from mmprune.errors import MMPruneError, ModelLoadError
from mmprune.passes.export import Export, ExportParams
from mmprune.passes.quantize import Quantize, QuantizeParams
from mmprune.quant import quantized_names
from tests.passes.test_structured import prune


def outputs(model, x):
    with torch.no_grad():
        return model(**x).logits_per_image


@pytest.mark.parametrize("quantize", [False, True])
def test_export_then_load_gives_identical_outputs(ctx, tmp_path, quantize):
    prune(ctx, target=0.5)
    if quantize:
        Quantize(QuantizeParams()).run(ctx)
        assert quantized_names(ctx.model)
    Export(ExportParams(path=str(tmp_path / "m"))).run(ctx)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "mmprune.json", "model.safetensors", "tokenizer_config.json",
            "preprocessor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded = mmprune.load(tmp_path / "m")
    from mmprune.saved import load_bundle
    b = load_bundle(tmp_path / "m")
    assert b.adapter.tokenizer("a red ring")["input_ids"] == ctx.adapter.tokenizer("a red ring")["input_ids"]
    x = ctx.adapter.example_inputs(3)
    assert torch.equal(outputs(ctx.model, x), outputs(loaded, x))
    spec = json.loads((tmp_path / "m" / "mmprune.json").read_text())
    assert spec["structure"]["vision.0.attn"]["kept"] == ctx.graph.groups["vision.0.attn"].kept
    assert (spec["quantization"] is not None) == quantize


def test_load_works_inside_inference_mode(ctx, tmp_path):
    # rebuilding the pruned structure traces the dense model with autograd, which inference mode
    # turns off: torch-pruning then found no module ("... is not in the dependency graph")
    prune(ctx, target=0.5)
    Export(ExportParams(path=str(tmp_path / "m"))).run(ctx)
    with torch.inference_mode():
        loaded = mmprune.load(tmp_path / "m")
    x = ctx.adapter.example_inputs(3)
    assert torch.equal(outputs(ctx.model, x), outputs(loaded, x))
    assert not any(p.is_inference() for p in loaded.parameters())   # it can still be fine-tuned


def test_quantized_export_is_smaller(ctx, tmp_path):
    Export(ExportParams(path=str(tmp_path / "fp32"))).run(ctx)
    Quantize(QuantizeParams()).run(ctx)
    Export(ExportParams(path=str(tmp_path / "int8"))).run(ctx)
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("int8") < 0.5 * size("fp32")


def test_load_never_unpickles(ctx, tmp_path, monkeypatch):
    Export(ExportParams(path=str(tmp_path / "m"))).run(ctx)

    import pickle

    def forbidden(*a, **k):
        raise AssertionError("something was unpickled")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    mmprune.load(tmp_path / "m")


def test_export_refuses_foreign_directory(ctx, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MMPruneError, match="not an mmprune export"):
        Export(ExportParams(path=str(tmp_path))).run(ctx)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_rejects_a_directory_without_spec(tmp_path):
    with pytest.raises(ModelLoadError, match="mmprune.json"):
        mmprune.load(tmp_path)


def test_version_1_exports_still_load_and_unknown_versions_are_refused(ctx, tmp_path):
    """Versions 2 and 3 added decoder token sites and a site's score; a version-1 spec (without
    them) reads the same."""
    Export(ExportParams(path=str(tmp_path / "m"))).run(ctx)
    spec_file = tmp_path / "m" / "mmprune.json"
    spec = json.loads(spec_file.read_text())
    assert spec["version"] == 3
    spec["version"] = 1
    spec_file.write_text(json.dumps(spec))
    x = ctx.adapter.example_inputs(2)
    assert torch.equal(outputs(ctx.model, x), outputs(mmprune.load(tmp_path / "m"), x))
    spec["version"] = 4
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="reads versions 1, 2, 3"):
        mmprune.load(tmp_path / "m")
