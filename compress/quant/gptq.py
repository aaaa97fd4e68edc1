"""GPTQ (Frantar et al., 2022) on the shared OBS column loop, with the grid as its quantizer hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compress.calibration.loop import LinearResult, LoopConfig
from compress.calibration.obs import OBSConfig, obs_compress
from compress.core.grid import GridSpec, fit_groups
from compress.core.linalg import damped_inverse_cholesky
from compress.quant.base import GridConfig, GridMethod
from compress.registry import register


@dataclass
class GPTQConfig(OBSConfig, LoopConfig, GridConfig):
    method: str = "gptq"
    # columns by decreasing Hessian diagonal, with static groups (no per-row g_idx)
    act_order: bool = True

    def validate(self) -> None:
        super().validate()
        self.validate_loop()
        self.validate_obs()

    def label_extras(self) -> str:
        return (" act-order" if self.act_order else "") + super().label_extras()


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: GridSpec, blocksize: int = 128, percdamp: float = 0.01,
                  damp_mode: str = "mean", act_order: bool = False, keep: Optional[torch.Tensor] = None,
                  sparsity: float = 0.0, nm=None, factor=None) -> LinearResult:
    """GPTQ on :func:`compress.calibration.obs.obs_compress` with the grid as its quantizer hook.

    ``act_order``: columns in order of decreasing ``diag(H)``, with *static* groups (each group's
    parameters fitted on the original weights, so that every column keeps its own group and no per-row
    group index is stored); when an N:M mask is chosen in the same loop, whole groups of M inputs are
    ordered (by their summed diagonal) so that each N:M group is still visited as one. Without it groups
    are fitted when the loop reaches them, on the updated weights. ``keep``: weights that must stay zero
    (a pruned model). ``sparsity``/``nm``: a mask chosen in the same column loop (SparseGPT's rule; the
    joint method). ``factor``: a precomputed ``(U, Damping)`` for this ``H`` (shared by linears that share
    an input; not with act-order).
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
        gs = cols if spec.whole_rows else spec.group_size
        col_group = perm // gs
        res = obs_compress(W[:, perm], U, blocksize, quant=spec, qparams=(scale, zero, col_group),
                           keep=None if keep is None else keep[:, perm], sparsity=sparsity, nm=nm, dead=dead[perm])
        weight = res.weight[:, inv]
        out_keep = None if res.keep is None else res.keep[:, inv]
    else:
        U, damping = factor if factor is not None else damped_inverse_cholesky(H, percdamp, damp_mode)
        qparams = None
        if spec.whole_rows:  # per channel (or tensor): one fit on the original weights, as the reference
            s, z = fit_groups(W.float(), spec, keep)
            qparams = (s, z, torch.zeros(cols, dtype=torch.long))
        res = obs_compress(W, U, blocksize, quant=spec, qparams=qparams, keep=keep, sparsity=sparsity, nm=nm, dead=dead)
        weight, out_keep, scale, zero = res.weight, res.keep, res.scale, res.zero
    info = {"damping": damping.to_dict()}
    if out_keep is not None:
        info["kept"] = float(out_keep.float().mean())
    return LinearResult(weight, scale, zero, spec=spec, info=info)


@register("quant", "gptq", GPTQConfig)
class GPTQ(GridMethod):
    """Column by column on the grid, the rounding error compensated on the columns left (Frantar et al., 2022)"""

    needs_hessian = True

    def step(self, weight, stats, job) -> LinearResult:
        c = self.cfg
        factor = None if c.act_order else stats.damped_factor(c.percdamp, c.damp_mode)
        return gptq_quantize(weight, stats.H, self.spec, c.blocksize, c.percdamp, c.damp_mode, c.act_order,
                             keep=job.keep, factor=factor)
