"""Module-level primitives: which modules are linear-like, their ``[out, in]`` weight view, the float
weight a (possibly bitsandbytes-quantized) linear computes with, unique parameters, the text config of a
model, and one context manager for temporary hooks."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch
from torch import nn


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return (Conv1D,)


LINEAR_TYPES: Tuple[type, ...] = (nn.Linear,) + _conv1d_type()
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_transposed(module: nn.Module) -> bool:
    """True for modules that store their weight as ``[in, out]`` (``transformers.Conv1D``)."""
    return not isinstance(module, nn.Linear) and isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an ``[out, in]`` tensor (a view: writing into it writes the module's weight)."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def linear_shape(module: nn.Module) -> Tuple[int, int]:
    """``(out, in)`` from the module's declared sizes where it has them (a bitsandbytes weight is packed)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    o, i = weight_matrix(module).shape
    return o, i


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a linear computes with, in its storage layout (``[out, in]`` for ``nn.Linear`` and
    bitsandbytes' linears, ``[in, out]`` for ``Conv1D``: :func:`weight_matrix` gives ``[out, in]``),
    bitsandbytes 8/4-bit dequantized."""
    w = module.weight
    if w.dtype in FLOAT_DTYPES:
        return w.float()
    import bitsandbytes as bnb  # optional dependency: only quantized modules reach here

    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb = getattr(w, "CB", None)
        scb = getattr(w, "SCB", None)
        if cb is None:  # after a forward bitsandbytes may keep the int8 data in the parameter itself
            cb, scb = w.data, module.state.SCB
        return cb.float() * scb.float().unsqueeze(1) / 127.0
    return w.float()


def is_quantized_storage(module: nn.Module) -> bool:
    """True when the module's weight is not a float tensor (bitsandbytes packed storage)."""
    return module.weight.dtype not in FLOAT_DTYPES


def unique_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Every parameter once (tied weights, e.g. embeddings and LM head, count once)."""
    seen = set()
    for p in module.parameters():
        key = id(p) if p.is_meta or p.numel() == 0 else p.data_ptr()  # meta / empty tensors share address 0
        if key in seen:
            continue
        seen.add(key)
        yield p


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(module))


def text_config(model: nn.Module):
    """The config of the language model (the text part of a multimodal config)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@contextlib.contextmanager
def hooks(handles: Iterable = ()) -> Iterator[List]:
    """Remove every hook handle in the list (given, or appended inside the block) on exit, whatever
    happens: ``with hooks() as hs: hs.append(m.register_forward_pre_hook(fn)); ...``"""
    hs = list(handles)
    try:
        yield hs
    finally:
        for h in hs:
            h.remove()


def pre_hooks(modules: Dict[str, nn.Module], make: Callable[[str], Callable]) -> List:
    """Forward pre-hooks ``make(name)`` on each named module; returns the handles (see :func:`hooks`)."""
    return [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]


@torch.no_grad()
def weights_fingerprint(model: nn.Module, names) -> Dict:
    """What a reload must reproduce exactly: a sha256 over the float32 weights the selected linears
    compute with (bitsandbytes dequantized; signed zeros made +0, so that equal values hash equal: a
    weight that rounds to -0.0 here is decoded as +0.0 from its integer code), in name order, and their
    zero counts. A process that imports only torch and transformers can recompute it
    (``compress reload-check``)."""
    return tensors_fingerprint((name, dense_weight(model.get_submodule(name))) for name in sorted(names))


def tensors_fingerprint(named) -> Dict:
    """:func:`weights_fingerprint` of ``(module name, weight in storage layout)`` pairs in name order (e.g.
    read one at a time from a checkpoint on disk)."""
    h = hashlib.sha256()
    zeros = {}
    for name, w in named:
        w = w.float().contiguous().cpu() + 0.0  # -0.0 -> +0.0: values
        h.update(name.encode())
        h.update(w.numpy().tobytes())
        zeros[name] = int(w.numel() - torch.count_nonzero(w))
    return {"sha256": h.hexdigest(), "modules": list(zeros), "zeros": zeros}
