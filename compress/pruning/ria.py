"""RIA, Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024).

Each weight is scored by its importance relative to the other weights of its input channel and of its output
channel, times its input channel's activation norm to the power ``a``:

    RIA_ij = ( |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik| ) * ||X_j||_2 ^ a

(``W`` is ``[out, in]``: the first sum runs over the outputs reading input ``j``, the second over the inputs of
output ``i``; the reference scales ``||X_j||`` by ``1 / sqrt(tokens)``, a constant that changes no ranking).
Unstructured masks compare the whole matrix (``prune.scope=layer``, the reference's default) or each output
row (``row``, Wanda's rule); N:M keeps the ``N`` best of every ``M`` inputs of each row. The reference's
optional channel reallocation for N:M permutes input channels, which a saved model would have to carry
into the producer of those inputs (the norm before q/k/v, up/gate before down): not done here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.calibration.loop import LinearResult
from compress.core.config import choice
from compress.core.errors import ConfigError
from compress.core.masks import make_mask
from compress.pruning.base import CalibratedMaskConfig, MaskMethod
from compress.registry import register


@dataclass
class RIAConfig(CalibratedMaskConfig):
    method: str = "ria"
    a: float = 0.5  # the activation norm's exponent (the paper's a; 0 = relative importance alone)
    scope: str = "layer"  # unstructured masks compared over the matrix (layer, the reference) or per output row

    def validate(self) -> None:
        super().validate()
        choice(self.key("scope"), self.scope, ("layer", "row"))
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or not self.a >= 0:
            raise ConfigError(f"{self.key('a')}={self.a!r} is not valid: it must be a number >= 0")


def ria_scores(weight: torch.Tensor, sqnorm: torch.Tensor, a: float) -> torch.Tensor:
    """``(|W| / column sums + |W| / row sums) * ||X||^a`` for an ``[out, in]`` weight and the per-input sums
    of squared activations."""
    w = weight.float().abs()
    tiny = torch.finfo(torch.float32).tiny
    ri = w / w.sum(0, keepdim=True).clamp_min(tiny) + w / w.sum(1, keepdim=True).clamp_min(tiny)
    return ri.mul_(sqnorm.float().sqrt().pow(a).unsqueeze(0))


@register("prune", "ria", RIAConfig)
class RIA(MaskMethod):
    """Relative importance (|W| over its row's and its column's sums) x the input norm^a (Zhang et al., 2024)"""

    needs_sqnorm = True

    @staticmethod
    def work_floats(out_features: int, in_features: int) -> float:
        return 2.75 * out_features * in_features  # |W|, the scores, mask chunks, the new weight

    def step(self, weight, stats, job) -> LinearResult:
        w = weight.float()
        scores = ria_scores(w, stats.sqnorm, float(self.cfg.a))
        mask = make_mask(scores, job.sparsity, job.nm, per_row=self.cfg.scope == "row")
        del scores
        return LinearResult(torch.where(mask, w, 0.0))
