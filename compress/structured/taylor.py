"""Taylor importance (LLM-Pruner's element-wise first order): |W x dL/dW| with full gradients summed over the
calibration batches; costs a full backward and one gradient per weight."""

from __future__ import annotations

from tqdm.auto import tqdm

from compress.registry import register
from compress.structured.scoring import Importance, ImportanceContext, ImportanceMethod, group_scores


@register("importance", "taylor")
class TaylorImportance(ImportanceMethod):
    """|W x dL/dW| with the gradients summed over the calibration batches (LLM-Pruner's element-wise score)"""

    global_ranking = True

    def __call__(self, ictx: ImportanceContext) -> Importance:
        model, st = ictx.model, ictx.structure
        params = {id(m.weight): m.weight for b in st.blocks for m in b.modules.values()}
        req = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in params.values():
            w.requires_grad_(True)
            w.grad = None
        was = model.training
        model.eval()
        ids = ictx.calib_ids
        dev = next(model.parameters()).device
        try:
            for s in tqdm(range(0, ids.shape[0], ictx.batch_size), desc="taylor gradients", disable=not ictx.progress):
                batch = ids[s:s + ictx.batch_size].to(dev)
                out = model(input_ids=batch, labels=batch, use_cache=False)
                out.loss.backward()
            res = []
            for b in st.blocks:
                S = {}
                for r, m in b.modules.items():
                    a, e = b.parts[r]
                    S[r] = (m.weight.detach()[a:e] * m.weight.grad[a:e]).abs()
                res.append(group_scores(b, S))
        finally:
            for w in params.values():
                w.grad = None
            for p, r in req.items():
                p.requires_grad_(r)
            model.train(was)
        return Importance(scores=res)
