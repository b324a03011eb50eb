"""int8 dynamic quantization of Linear layers (torch's own), and its safetensors-friendly state."""
from __future__ import annotations

import warnings

import torch
from torch import nn

try:  # torch keeps eager-mode quantization under torch.ao (deprecated in favour of torchao)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
    from torch.ao.quantization import quantize_dynamic
except ImportError:  # pragma: no cover - depends on the installed torch
    DynamicQuantLinear, quantize_dynamic = None, None

SCHEME = "int8_dynamic"


def quantize_linears(model: nn.Module, names: list[str]) -> None:
    """Replace the Linear modules `names` of `model` by int8 dynamically quantized ones, in place."""
    if quantize_dynamic is None:
        raise RuntimeError("this torch build has no torch.ao.quantization.quantize_dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {n: torch.ao.quantization.default_dynamic_qconfig for n in names},
                         dtype=torch.qint8, inplace=True)


def quantized_names(model: nn.Module) -> list[str]:
    if DynamicQuantLinear is None:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, DynamicQuantLinear)]


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors that describe `model` fully, quantized layers as int8 + scale + zero point."""
    qnames = quantized_names(model)
    prefixes = tuple(n + "." for n in qnames)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not k.startswith(prefixes)}
    for n in qnames:
        m = model.get_submodule(n)
        w, b = m.weight(), m.bias()
        state[f"{n}.qweight"] = w.int_repr().contiguous()
        if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            state[f"{n}.qscale"] = torch.tensor([w.q_scale()], dtype=torch.float64)
            state[f"{n}.qzero"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
        else:
            state[f"{n}.qscale"] = w.q_per_channel_scales().contiguous()
            state[f"{n}.qzero"] = w.q_per_channel_zero_points().contiguous()
            state[f"{n}.qaxis"] = torch.tensor([w.q_per_channel_axis()], dtype=torch.int64)
        if b is not None:
            state[f"{n}.bias"] = b.detach().clone().contiguous()
    return state


def load_state_tensors(model: nn.Module, state: dict[str, torch.Tensor], qnames: list[str]) -> None:
    """Inverse of `state_tensors` on a float model: load, quantize the layers `qnames`, set int8."""
    prefixes = tuple(n + "." for n in qnames)
    plain = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise ValueError(f"saved weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if not qnames:
        return
    quantize_linears(model, qnames)
    for n in qnames:
        m = model.get_submodule(n)
        q = state[f"{n}.qweight"]
        if f"{n}.qaxis" in state:
            w = torch._make_per_channel_quantized_tensor(q, state[f"{n}.qscale"], state[f"{n}.qzero"],
                                                         int(state[f"{n}.qaxis"][0]))
        else:
            w = torch._make_per_tensor_quantized_tensor(q, float(state[f"{n}.qscale"][0]),
                                                        int(state[f"{n}.qzero"][0]))
        m.set_weight_bias(w, state.get(f"{n}.bias"))
