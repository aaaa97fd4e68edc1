"""Magnitude importance: squared weights summed over each group (group L2), no calibration."""

from __future__ import annotations

from compress.registry import register
from compress.structured.scoring import Importance, ImportanceContext, ImportanceMethod, group_scores


@register("importance", "magnitude")
class MagnitudeImportance(ImportanceMethod):
    """Squared weights summed over each group (group L2); no calibration"""

    needs_calibration = False
    global_ranking = True
    statistics_only = True

    def __call__(self, ictx: ImportanceContext) -> Importance:
        return Importance(scores=[group_scores(b, {r: b.weight(r).detach().float().square() for r in b.modules})
                                  for b in ictx.structure.blocks])
