"""Block importance (depth pruning): 1 - cos(block input, block output), mean over the calibration tokens."""

from __future__ import annotations

import torch

from compress.calibration.loop import observe_blocks
from compress.registry import register
from compress.structured.scoring import Importance, ImportanceContext, ImportanceMethod


@register("importance", "block")
class BlockImportance(ImportanceMethod):
    """1 - cos(block input, block output), mean over the calibration tokens: whole blocks are removed (depth)"""

    unit = "depth"

    @torch.no_grad()
    def __call__(self, ictx: ImportanceContext) -> Importance:
        scores = []

        def observe(bidx, block, inputs, outs, stats):
            tot = n = 0.0
            for h_in, h_out in zip(inputs.hidden, outs):
                c = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                tot += float((1 - c).sum())
                n += c.numel()
            scores.append(tot / n)

        observe_blocks(ictx.model, ictx.calib_ids, observe, batch_size=ictx.batch_size, device=ictx.device,
                       progress=ictx.progress, desc="block importance")
        return Importance(scores=torch.tensor(scores, dtype=torch.float64))
