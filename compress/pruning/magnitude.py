"""Magnitude pruning: |W|, thresholded per matrix (layer scope, as in the reference) or over all targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.calibration.loop import LinearResult
from compress.core.config import choice
from compress.core.errors import ConfigError
from compress.core.masks import make_mask
from compress.core.modules import weight_matrix
from compress.pruning.base import MaskConfig, MaskMethod
from compress.registry import register


@dataclass
class MagnitudeConfig(MaskConfig):
    method: str = "magnitude"
    scope: str = "layer"  # layer (per module) | global (one threshold over every target)

    def validate(self) -> None:
        super().validate()
        choice(self.key("scope"), self.scope, ("layer", "global"))
        if self.nm is not None and self.scope == "global":
            raise ConfigError(f"{self.key('scope')}='global' needs {self.key('pattern')}=unstructured")


@register("prune", "magnitude", MagnitudeConfig)
class Magnitude(MaskMethod):
    """|W|, thresholded per matrix (layer scope) or over all targets (global scope); no calibration"""

    needs_calibration = False

    def prepare(self, targets, sparsities) -> None:
        self.thresh = None
        if self.cfg.scope == "global":
            allw = torch.cat([weight_matrix(m).detach().abs().flatten().float().cpu() for _, _, m in targets.items()])
            k = int(allw.numel() * self.cfg.target_sparsity)
            self.thresh = float(torch.kthvalue(allw, k).values) if k else -1.0

    def step(self, weight, stats, job) -> LinearResult:
        w = weight.float()
        if self.thresh is not None:
            return LinearResult(w * (w.abs() > self.thresh))
        mask = make_mask(w.abs(), job.sparsity, job.nm, per_row=False)
        return LinearResult(torch.where(mask, w, 0.0))

    def verify_scope(self) -> str:
        return "global" if self.cfg.scope == "global" else "module"
