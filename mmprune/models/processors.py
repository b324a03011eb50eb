"""Image processors for models that ship none (tiny models): real HF objects, saved with exports."""
from __future__ import annotations

try:  # transformers 5 without torchvision: the PIL backend, without its fallback warning
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _ImageProcessor


def square_image_processor(size: int):
    """Resize the short side to `size`, centre-crop `size`×`size`, CLIP mean/std normalisation."""
    return _ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def load_processors(directory) -> tuple[object | None, object | None]:
    """The tokenizer and image processor saved in a model directory, where it has them."""
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoTokenizer

    d = Path(directory)
    tok = AutoTokenizer.from_pretrained(d) if (d / "tokenizer_config.json").exists() else None
    ip = AutoImageProcessor.from_pretrained(d) if (d / "preprocessor_config.json").exists() else None
    return tok, ip


def save_processors(adapter, directory) -> None:
    for obj in (adapter.tokenizer, adapter.image_processor):
        if obj is not None:
            obj.save_pretrained(directory)
