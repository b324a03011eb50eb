"""mmprune: a compression compiler for vision-language models."""
__version__ = "0.1.0"


def load(directory):
    """Rebuild a runnable model from an mmprune export directory (safetensors + mmprune.json)."""
    from mmprune.saved import load as _load

    return _load(directory)


__all__ = ["__version__", "load"]
