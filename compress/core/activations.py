"""8-bit input activations of the quantized linears, simulated: each selected linear's input is quantized
and dequantized (:func:`compress.core.grid.act_fake_quant`) by a forward pre-hook, then multiplied in float
with the (already quantized) weight. That is what a W8A8 or FP8 kernel computes, up to the order of its
integer / FP8 accumulation, and what every peer does off-GPU.

* **dynamic** scales (per token or per tensor) are computed from each input at run time: nothing to
  calibrate;
* **static** per-tensor scales are fixed once: ``max|x|`` of the linear's input over every calibration
  token, observed in one forward of the quantized model (weights quantized, activations in float); with
  several ranks, the maximum over the ranks' samples.

The hook object is kept on the module (``module.compress_act``), not in a global, so that an evaluation,
a copy or the saver finds it; it holds no parameter or buffer, so ``state_dict`` and the saved checkpoint
do not change. The saved compressed-tensors checkpoint states the activation scheme in its config
(``input_activations``; static scales as ``input_scale``), which vLLM reads.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from compress.core import distributed
from compress.core.grid import ActSpec, act_fake_quant

ATTR = "compress_act"


class ActQuant:
    """The pre-hook of one linear: ``spec`` and, when static, its ``scale`` (a 0-dim float32 tensor)."""

    def __init__(self, spec: ActSpec, scale: Optional[torch.Tensor] = None):
        self.spec, self.scale = spec, scale
        self.handle = None

    def __call__(self, module, args):
        return (act_fake_quant(args[0], self.spec, self.scale),) + tuple(args[1:])


def attach(model: nn.Module, names: Iterable[str], spec: ActSpec,
           scales: Optional[Dict[str, torch.Tensor]] = None) -> int:
    """Quantize the inputs of the modules ``names`` (full names in ``model``) from now on. Returns how many."""
    n = 0
    for name in names:
        mod = model.get_submodule(name)
        detach_one(mod)
        hook = ActQuant(spec, None if scales is None else scales[name])
        hook.handle = mod.register_forward_pre_hook(hook)
        setattr(mod, ATTR, hook)
        n += 1
    return n


def detach_one(mod: nn.Module) -> None:
    old = getattr(mod, ATTR, None)
    if old is not None:
        old.handle.remove()
        delattr(mod, ATTR)


def detach(model: nn.Module) -> int:
    """Remove every activation hook (the weight-only model). Returns how many there were."""
    mods = [m for m in model.modules() if getattr(m, ATTR, None) is not None]
    for m in mods:
        detach_one(m)
    return len(mods)


def attached(model: nn.Module) -> Dict[str, ActQuant]:
    return {n: getattr(m, ATTR) for n, m in model.named_modules() if getattr(m, ATTR, None) is not None}


@torch.no_grad()
def observe_static(model: nn.Module, names: Iterable[str], calib_ids: torch.Tensor, batch_size: int = 1,
                   device=None, progress: bool = False) -> Dict[str, torch.Tensor]:
    """``max|x|`` of each named module's input over the calibration tokens (one forward of ``model``), as a
    0-dim float32 tensor; over several ranks, each rank's own samples then the maximum of the ranks."""
    names = list(names)
    amax: Dict[str, torch.Tensor] = {}

    def observer(name):
        def pre(mod, args):
            m = args[0].detach().abs().amax().float().cpu()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(observer(n)) for n in names]
    device = device if device is not None else next(model.parameters()).device
    ids = calib_ids[distributed.rank()::distributed.world_size()] if distributed.active() else calib_ids
    try:
        for a in range(0, ids.shape[0], batch_size):
            model(ids[a:a + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in amax]
    if missing:
        raise RuntimeError(f"static activation scales: the calibration forward never reached {missing[:6]}")
    if distributed.active():
        ranks = distributed.gather_objects({n: float(v) for n, v in amax.items()})  # every rank gets all
        amax = {n: torch.tensor(max(r[n] for r in ranks), dtype=torch.float32) for n in names}
    return amax


def static_scales(amax: Dict[str, torch.Tensor], spec: ActSpec) -> Dict[str, torch.Tensor]:
    """The static scale of each input from its observed ``max|x|`` (the same rule as the dynamic scale)."""
    return {n: torch.where(a > 0, a / spec.qmax, torch.ones_like(a)) for n, a in amax.items()}
