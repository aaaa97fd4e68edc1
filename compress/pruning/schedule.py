"""Per-block sparsity schedules: uniform, an explicit list, or OWL.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): a block's outlier ratio is the share of
its Wanda scores |W| * ||X|| above ``owl_m`` times their mean; ratios are rescaled to
[0, 2 * owl_lambda], centred, and blocks with more outliers keep more weights. The mean sparsity stays
at the target. The ratios come from one dense pass over the calibration data.
"""

from __future__ import annotations

from typing import List

import torch

from compress.calibration.loop import observe_blocks
from compress.calibration.targets import resolve_targets
from compress.core.errors import ConfigError
from compress.core.modules import weight_matrix


def owl_from_ratios(ratios: List[float], sparsity: float, lam: float) -> List[float]:
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0:
        return [float(sparsity)] * len(ratios)
    r = (r - r.min()) * (2 * lam / span)
    density = r - r.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


@torch.no_grad()
def owl_outlier_ratios(model, calib_ids, cfg, batch_size: int = 1, device=None, offload: bool = False,
                       progress: bool = True) -> List[float]:
    """Per block, the share of Wanda scores above ``cfg.owl_m`` x their mean (one pass over the dense model)."""
    ratios: List[float] = []
    targets = resolve_targets(model, cfg.targets, cfg.ignore).require("prune")

    def observe(bidx, block, inputs, outs, stats):
        linears = targets.per_block[bidx]
        scores = torch.cat([(weight_matrix(m).float().abs() * stats[n].sqnorm.sqrt().unsqueeze(0)).flatten()
                            for n, m in linears.items()])
        ratios.append(float((scores > cfg.owl_m * scores.mean()).float().mean()))

    observe_blocks(model, calib_ids, observe, lambda bidx, block: targets.per_block[bidx], sqnorm=True,
                   propagate="dense", batch_size=batch_size, device=device, offload=offload, progress=progress,
                   desc="owl ratios")
    return ratios


def layer_sparsities(cfg, nblocks: int, model=None, calib_ids=None, batch_size: int = 1, device=None,
                     offload: bool = False, progress: bool = True) -> List[float]:
    """The target sparsity of each block under ``cfg.schedule`` (a mask method's config)."""
    if cfg.schedule == "uniform":
        return [float(cfg.sparsity)] * nblocks
    if cfg.schedule == "list":
        vals = [float(v) for v in cfg.layer_sparsities]
        if len(vals) != nblocks:
            raise ConfigError(f"{cfg.key('layer_sparsities')} has {len(vals)} values but the model has {nblocks} blocks")
        return vals
    if cfg.schedule == "owl":
        ratios = owl_outlier_ratios(model, calib_ids, cfg, batch_size, device, offload, progress)
        return owl_from_ratios(ratios, float(cfg.sparsity), cfg.owl_lambda)
    raise ConfigError(f"{cfg.key('schedule')}={cfg.schedule!r}")
