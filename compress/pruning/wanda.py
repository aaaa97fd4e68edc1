"""Wanda (Sun et al., 2023): |W| * ||X||_2 per input channel, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.calibration.loop import LinearResult
from compress.core.masks import make_mask
from compress.pruning.base import CalibratedMaskConfig, MaskMethod
from compress.registry import register


@dataclass
class WandaConfig(CalibratedMaskConfig):
    method: str = "wanda"


@register("prune", "wanda", WandaConfig)
class Wanda(MaskMethod):
    """|W| x the input column's L2 norm, compared within each output row (Sun et al., 2023)"""

    needs_sqnorm = True

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        return 1.75 * out_features * in_features  # scores, mask chunks (kthvalue's copies), the new weight

    def step(self, weight, stats, job) -> LinearResult:
        w = weight.float()
        scores = w.abs().mul_(stats.sqnorm.sqrt().unsqueeze(0))
        mask = make_mask(scores, job.sparsity, job.nm, per_row=True)
        del scores
        return LinearResult(torch.where(mask, w, 0.0))  # no float copy of the mask (w * mask would make one)
