"""SparseGPT (Frantar & Alistarh, 2023): blocked OBS with lazy batch updates, on the shared column loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from compress.calibration.loop import LinearResult
from compress.calibration.obs import OBSConfig, obs_compress
from compress.core.errors import ConfigError
from compress.core.linalg import corrected_target, damped_inverse_cholesky
from compress.pruning.base import CalibratedMaskConfig, MaskMethod
from compress.registry import register


@dataclass
class SparseGPTConfig(OBSConfig, CalibratedMaskConfig):
    method: str = "sparsegpt"
    # reconstruct the *dense* model's layer outputs from the pruned model's inputs,
    # min ||W X_dense - W' X_pruned||, instead of the layer's own outputs (needs the single pass)
    error_correction: bool = False

    def validate(self) -> None:
        super().validate()
        self.validate_obs()
        if self.error_correction and self.sequential == "false":
            raise ConfigError(f"{self.key('error_correction')}=true needs {self.key('sequential')}=true or auto")


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: Optional[Tuple[int, int]] = None,
                    blocksize: int = 128, percdamp: float = 0.01, damp_mode: str = "mean",
                    hinv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SparseGPT through the shared column loop :func:`compress.calibration.obs.obs_compress` with its mask
    hook. Within each column block the mask is chosen from ``w^2 / [H^-1]_ii^2`` (exactly ``round(numel*s)``
    entries of the block for unstructured; N of every M inputs per row, chosen on the updated weights, for
    N:M, with column blocks starting on group boundaries), then pruned columns are zeroed one at a time and
    the error is compensated on the remaining columns. ``H`` is the float32 ``X^T X``; dead inputs (zero
    diagonal) are zeroed first. ``hinv``: the damped inverse factor precomputed for this H."""
    U = hinv if hinv is not None else damped_inverse_cholesky(H, percdamp, damp_mode)[0]
    return obs_compress(W, U, blocksize, sparsity=sparsity, nm=nm, dead=torch.diagonal(H) == 0).weight


@register("prune", "sparsegpt", SparseGPTConfig)
class SparseGPT(MaskMethod):
    """Blocked OBS: the mask chosen column block by column block, the error compensated on the columns left"""

    needs_hessian = True

    def step(self, weight, stats, job) -> LinearResult:
        c = self.cfg
        H = stats.H
        if stats.G is not None:
            weight = corrected_target(weight, H, stats.G, c.percdamp, c.damp_mode)
        return LinearResult(sparsegpt_prune(weight, H, job.sparsity, job.nm, c.blocksize, c.percdamp, c.damp_mode,
                                            hinv=stats.hinv_factor(c.percdamp, c.damp_mode)))

    def info(self, stats):
        return {"damping": stats.damped_factor(self.cfg.percdamp, self.cfg.damp_mode)[1].to_dict()}
