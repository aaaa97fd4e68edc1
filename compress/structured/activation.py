"""Activation importance (FLAP-style): one forward pass over the dense model through the calibration loop.

``activation_metric=fluctuation`` (FLAP): the variance of each input column of o and down over the
calibration tokens x the squared norm of that weight column; ``activation_metric=wanda``: |W| x the input
column's L2 norm on every role. The input means are kept for FLAP's bias compensation.
"""

from __future__ import annotations

from compress.calibration.loop import observe_blocks
from compress.registry import register
from compress.structured.scoring import Importance, ImportanceContext, ImportanceMethod, group_scores


@register("importance", "activation", owns=("activation_metric", "bias_compensation"))
class ActivationImportance(ImportanceMethod):
    """FLAP's fluctuation (input variance x squared weight-column norm of o and down), or Wanda's |W| x ||X||; one pass"""

    global_ranking = True
    statistics_only = True

    def __call__(self, ictx: ImportanceContext) -> Importance:
        st = ictx.structure
        metric = ictx.cfg.activation_metric
        roles = ("o", "down") if metric == "fluctuation" else tuple(st.blocks[0].modules)
        res, means = [], []

        def linears_of(bidx, block):
            b = st.blocks[bidx]
            return {st.pattern.roles[r]: b.modules[r] for r in roles}

        def observe(bidx, block, inputs, outs, stats):
            b = st.blocks[bidx]
            mom = {r: stats[st.pattern.roles[r]] for r in roles}
            means.append({r: m.mean for r, m in mom.items() if r in ("o", "down")})
            if metric == "fluctuation":
                S = {}
                for r in ("o", "down"):
                    w = b.weight(r).detach().double()
                    col = mom[r].var.clamp_min(0) * w.square().sum(0).to(mom[r].var.device)
                    S[r] = col.unsqueeze(0)  # one row: the column scores (group_scores sums over rows)
            else:  # wanda: |W_ij| * ||X_j||
                S = {r: b.weight(r).detach().abs().double() * mom[r].sumsq.sqrt().to(b.weight(r).device).unsqueeze(0)
                     for r in roles}
            res.append(group_scores(b, S))

        observe_blocks(ictx.model, ictx.calib_ids, observe, linears_of, moments=True, batch_size=ictx.batch_size,
                       device=ictx.device, progress=ictx.progress, desc="structured importance")
        return Importance(scores=res, means=means)
