"""Quantization methods: small registered classes that declare the statistics they need and compress.

Each method gets a linear's ``[out, in]`` weight, the statistics it declared (``InputStats``: the
float32 Hessian for GPTQ) and the mask of weights that must stay exactly zero (a pruned model's zeros:
``keep`` False), and returns a :class:`Quantized`: the dequantized weight (kept entries on the grid,
pruned entries exactly 0) with its grid parameters. bitsandbytes is not a per-linear computation (it
swaps modules for its own), see :mod:`compress.quant.bnb`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Type

import torch

from compress.calibration.linalg import damped_inverse_cholesky
from compress.calibration.obs import obs_compress
from compress.quant.grid import GridSpec, fit_groups, rtn

REGISTRY: Dict[str, Type["QuantMethod"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Quantized:
    weight: torch.Tensor  # [out, in] float32, dequantized
    scale: torch.Tensor  # [out, groups] float32
    zero: Optional[torch.Tensor]  # [out, groups] (integer values, float storage) or None (symmetric)
    info: Dict = field(default_factory=dict)


def grid_spec(cfg) -> GridSpec:
    return GridSpec(bits=int(cfg.bits), symmetric=bool(cfg.symmetric), group_size=int(cfg.group_size),
                    mse=bool(getattr(cfg, "mse", False)))


class QuantMethod:
    name = "base"
    needs_calibration = True
    needs_hessian = False
    needs_sqnorm = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = grid_spec(cfg)

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        return 3.0 * out_features * in_features

    def quantize(self, weight: torch.Tensor, stats, keep: Optional[torch.Tensor]) -> Quantized:
        raise NotImplementedError


@register
class RTN(QuantMethod):
    """Round to nearest on the grid (per group or per channel), optional MSE clipping search."""

    name = "rtn"
    needs_calibration = False

    def quantize(self, weight, stats, keep):
        deq, scale, zero = rtn(weight, self.spec, keep)
        return Quantized(deq, scale, zero)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: GridSpec, blocksize: int = 128, percdamp: float = 0.01,
                  damp_mode: str = "mean", act_order: bool = False, keep: Optional[torch.Tensor] = None,
                  sparsity: float = 0.0, nm=None, factor=None) -> Quantized:
    """GPTQ (Frantar et al., 2022) on the shared OBS column loop with the grid as its quantizer hook.

    ``act_order``: columns in order of decreasing ``diag(H)``, with *static* groups (each group's
    parameters fitted on the original weights, so that every column keeps its own group and no per-row
    group index is stored); when an N:M mask is chosen in the same loop, whole groups of M inputs are
    ordered (by their summed diagonal) so that each N:M group is still visited as one. Without it groups
    are fitted when the loop reaches them, on the updated weights. ``keep``: weights that must stay zero (a pruned model). ``sparsity``/``nm``: the joint
    one-pass mode, the mask chosen in the same column loop (SparseGPT's rule). ``factor``: a precomputed
    ``(U, Damping)`` for this ``H`` (shared by linears that share an input; not with act-order).
    """
    cols = W.shape[1]
    dead = torch.diagonal(H) == 0
    if act_order:
        diag = torch.diagonal(H)
        if nm is not None and keep is None:  # the N:M mask is chosen in the loop: each group of M inputs
            m = nm[1]  # stays together (groups ordered by their summed diagonal), so the choice stays N of M
            gperm = torch.argsort(diag.reshape(-1, m).sum(1), descending=True, stable=True)
            perm = (gperm.unsqueeze(1) * m + torch.arange(m, device=H.device)).flatten()
        else:
            perm = torch.argsort(diag, descending=True, stable=True)
        inv = torch.argsort(perm)
        Hp = H[perm][:, perm]
        U, damping = damped_inverse_cholesky(Hp, percdamp, damp_mode)
        del Hp
        scale, zero = fit_groups(W.float(), spec, keep)  # static groups on the original columns
        gs = cols if spec.group_size == -1 else spec.group_size
        col_group = perm // gs
        res = obs_compress(W[:, perm], U, blocksize, quant=spec, qparams=(scale, zero, col_group),
                           keep=None if keep is None else keep[:, perm], sparsity=sparsity, nm=nm, dead=dead[perm])
        weight = res.weight[:, inv]
        out_keep = None if res.keep is None else res.keep[:, inv]
    else:
        U, damping = factor if factor is not None else damped_inverse_cholesky(H, percdamp, damp_mode)
        qparams = None
        if spec.group_size == -1:  # per channel: one fit on the original weights, as the reference
            s, z = fit_groups(W.float(), spec, keep)
            qparams = (s, z, torch.zeros(cols, dtype=torch.long))
        res = obs_compress(W, U, blocksize, quant=spec, qparams=qparams, keep=keep, sparsity=sparsity, nm=nm, dead=dead)
        weight, out_keep, scale, zero = res.weight, res.keep, res.scale, res.zero
    info = {"damping": damping.to_dict()}
    if out_keep is not None:
        info["kept"] = float(out_keep.float().mean())
    return Quantized(weight, scale, zero, info)


@register
class GPTQ(QuantMethod):
    name = "gptq"
    needs_hessian = True

    def quantize(self, weight, stats, keep):
        c = self.cfg
        factor = None if c.act_order else stats.damped_factor(c.percdamp, c.damp_mode)
        return gptq_quantize(weight, stats.H, self.spec, c.blocksize, c.percdamp, c.damp_mode, c.act_order, keep=keep,
                             factor=factor)


def get_method(name: str, cfg) -> QuantMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown quantization method {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](cfg)
