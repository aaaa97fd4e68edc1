"""Pruning methods: small registered classes that declare the statistics they need and compress.

A method declares the statistics it needs (``needs_calibration``, ``needs_hessian``,
``needs_sqnorm``) and, for each target linear, gets an :class:`~compress.calibration.stats.InputStats`
holding them (token count, per-column squared norms, the float32 Hessian ``X^T X``, a token subsample
for error reporting) and returns the new ``[out, in]`` weight. It never walks blocks or registers
hooks itself: the engine and the calibration layer do that.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch

from compress.calibration.linalg import damped_inverse_cholesky
from compress.calibration.obs import obs_compress
from compress.calibration.stats import InputStats
from compress.pruning.masks import make_mask

REGISTRY: Dict[str, Type["PruningMethod"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class PruningMethod:
    name = "base"
    needs_calibration = True
    needs_hessian = False
    needs_sqnorm = False

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        """float32 values allocated while one ``[out, in]`` linear is pruned (scores, mask, the new weight,
        the error terms): the memory estimator's per-linear working set. Measured for Wanda and SparseGPT
        at 4096 x 11008 (heap peak above the weight, the statistics and the damped factor): Wanda 1.75,
        SparseGPT 1.4."""
        return 1.5 * out_features * in_features

    def __init__(self, cfg):
        self.cfg = cfg

    def prune_weight(self, weight: torch.Tensor, stats: Optional[InputStats], sparsity: float,
                     nm: Optional[Tuple[int, int]]) -> torch.Tensor:
        """Return the new float32 ``[out, in]`` weight (zeros where pruned)."""
        raise NotImplementedError

    def info(self, stats: Optional[InputStats]) -> Dict:
        """Per-module facts for the report (e.g. the damping a Hessian needed)."""
        return {}


@register
class Magnitude(PruningMethod):
    """|W|, thresholded per matrix (layer scope, as in the reference) or over all targets (global)."""

    name = "magnitude"
    needs_calibration = False

    def prune_weight(self, weight, stats, sparsity, nm):
        w = weight.float()
        mask = make_mask(w.abs(), sparsity, nm, per_row=False)
        return torch.where(mask, w, 0.0)


@register
class Wanda(PruningMethod):
    """|W| * ||X||_2 per input channel, compared within each output row (Sun et al., 2023)."""

    name = "wanda"
    needs_sqnorm = True

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        return 1.75 * out_features * in_features  # scores, mask chunks (kthvalue's copies), the new weight

    def prune_weight(self, weight, stats, sparsity, nm):
        w = weight.float()
        scores = w.abs().mul_(stats.sqnorm.sqrt().unsqueeze(0))
        mask = make_mask(scores, sparsity, nm, per_row=True)
        del scores
        return torch.where(mask, w, 0.0)  # no float copy of the mask (w * mask would make one)


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: Optional[Tuple[int, int]] = None,
                    blocksize: int = 128, percdamp: float = 0.01, damp_mode: str = "mean",
                    hinv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): blocked OBS with lazy batch updates, through the shared
    column loop :func:`compress.calibration.obs.obs_compress` with its mask hook.

    Within each column block the mask is chosen from ``w^2 / [H^-1]_ii^2`` (exactly ``round(numel*s)``
    entries of the block for unstructured; N of every M inputs per row, chosen on the updated weights,
    for N:M, with column blocks starting on group boundaries), then pruned columns are zeroed one at a
    time and the error is compensated on the remaining columns. ``H`` is the float32 ``X^T X``; dead
    inputs (zero diagonal) are zeroed first. ``hinv``: the damped inverse factor precomputed for this H.
    """
    U = hinv if hinv is not None else damped_inverse_cholesky(H, percdamp, damp_mode)[0]
    return obs_compress(W, U, blocksize, sparsity=sparsity, nm=nm, dead=torch.diagonal(H) == 0).weight


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs_hessian = True

    def prune_weight(self, weight, stats, sparsity, nm):
        H = stats.H
        if stats.G is not None:
            weight = corrected_target(weight, H, stats.G, self.cfg.percdamp, self.cfg.damp_mode)
        return sparsegpt_prune(weight, H, sparsity, nm, self.cfg.blocksize, self.cfg.percdamp, self.cfg.damp_mode,
                               hinv=stats.hinv_factor(self.cfg.percdamp, self.cfg.damp_mode))

    def info(self, stats):
        return {"damping": stats.damped_factor(self.cfg.percdamp, self.cfg.damp_mode)[1].to_dict()}

    def prune_and_quantize(self, weight, stats, sparsity, nm, qcfg, spec):
        """The joint one-pass mode (``quant.joint=true``): SparseGPT's mask rule and GPTQ's grid in the
        same column loop, with GPTQ's loop settings (``quant.blocksize``, ``percdamp``, ``damp_mode``,
        ``act_order``). Returns a :class:`compress.quant.methods.Quantized`."""
        from compress.quant.methods import gptq_quantize

        H = stats.H
        if stats.G is not None:
            weight = corrected_target(weight, H, stats.G, qcfg.percdamp, qcfg.damp_mode)
        factor = None if qcfg.act_order else stats.damped_factor(qcfg.percdamp, qcfg.damp_mode)
        return gptq_quantize(weight, H, spec, qcfg.blocksize, qcfg.percdamp, qcfg.damp_mode, qcfg.act_order,
                             sparsity=sparsity, nm=nm, factor=factor)


@torch.no_grad()
def corrected_target(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, percdamp: float, damp_mode: str = "mean"):
    """Least-squares weight that maps the pruned model's inputs to the dense model's outputs.

    ``argmin_V ||W X_d - V X_p||`` = ``W G H^-1`` with ``G = X_d^T X_p`` and ``H = X_p^T X_p`` (damped as
    in SparseGPT). Pruning this target with the usual OBS objective on ``H`` then minimises the error
    against the dense outputs, so errors from earlier layers are corrected instead of copied.
    """
    diag = torch.diagonal(H)
    damp = percdamp * (diag.mean() if damp_mode == "mean" else diag.median())
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    dead = diag == 0
    Hd[dead, dead] = 1
    L = torch.linalg.cholesky(Hd)
    rhs = (W.float() @ G).t()  # [in, out]
    return torch.cholesky_solve(rhs, L).t()


def get_method(name: str, cfg) -> PruningMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](cfg)
