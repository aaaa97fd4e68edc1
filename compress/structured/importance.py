"""Importance of structural groups, behind one interface: scores per group, higher = keep.

Every estimator returns, per block, ``{"heads": [n_heads], "kv": [n_kv], "channels": [intermediate]}``
(the q/o part of each query head, the k/v part of each KV head, each MLP channel); :func:`attn_scores`
folds heads and KV heads into the unit being removed (KV groups or query heads). Estimators that score
single weights go through :func:`group_scores`, which sums the weight scores of each group inside each
module and normalises each module's vector to sum 1 (so q, k, v, o, gate, up and down weigh alike
whatever their scale).

* ``magnitude``: squared weights (group L2).
* ``activation``: forward only, through the calibration pipeline (one pass over the dense model):
  FLAP's fluctuation (variance of each input column of o and down over the calibration tokens x the
  squared norm of that weight column), or ``activation_metric=wanda`` (|W| x input-column norm on
  every role).
* ``taylor``: first-order Taylor |W x dL/dW| with full gradients summed over the calibration batches
  (LLM-Pruner's element-wise score); costs a full backward and a gradient per weight.
* ``block``: 1 - cos(block input, block output), mean over the calibration tokens (depth pruning).
* ``lora``: see :mod:`compress.structured.lora` (scores from the LoRA factors during fine-tuning).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from compress.structured.groups import BlockStructure, ModelStructure

ESTIMATORS: Dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        ESTIMATORS[name] = fn
        return fn
    return deco


def _normalise(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    s = v.sum()
    return v / s if s > 0 else v


def group_scores(b: BlockStructure, S: Dict[str, torch.Tensor], post: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """Per-group sums of per-weight scores ``S[role]`` (each ``[out, in]`` like the weight), normalised
    per module. Roles missing from ``S`` contribute nothing. ``post`` (e.g. ``torch.square``) maps each
    module's group sums before the normalisation (for signed weight scores)."""
    hd = b.head_dim
    post = post or (lambda v: v)

    def _norm(v):
        return _normalise(post(v))

    heads = torch.zeros(b.n_heads, dtype=torch.float64)
    kv = torch.zeros(b.n_kv, dtype=torch.float64)
    ch = torch.zeros(b.intermediate, dtype=torch.float64)
    if "q" in S:
        heads += _norm(S["q"].float().sum(1).reshape(b.n_heads, hd).sum(1).cpu())
    if "o" in S:
        heads += _norm(S["o"].float().sum(0).reshape(b.n_heads, hd).sum(1).cpu())
    for r in ("k", "v"):
        if r in S:
            kv += _norm(S[r].float().sum(1).reshape(b.n_kv, hd).sum(1).cpu())
    for r in ("gate", "up"):
        if r in S:
            ch += _norm(S[r].float().sum(1).cpu())
    if "down" in S:
        ch += _norm(S["down"].float().sum(0).cpu())
    return {"heads": heads, "kv": kv, "channels": ch}


def attn_scores(b: BlockStructure, s: Dict[str, torch.Tensor], attn_unit: str) -> torch.Tensor:
    """The score of each attention unit: per KV group (its query heads and its KV head) or per query head."""
    if attn_unit == "kv_group":
        return s["heads"].reshape(b.n_kv, b.group_size).sum(1) + s["kv"]
    return s["heads"].reshape(b.n_kv, b.group_size)


def weight_of(b: BlockStructure, role: str) -> torch.Tensor:
    return b.modules[role].weight.detach()


@register("magnitude")
def magnitude_scores(model, structure: ModelStructure, ctx) -> List[Dict]:
    return [group_scores(b, {r: weight_of(b, r).float().square() for r in b.modules}) for b in structure.blocks]


class _InputMoments:
    """Per input column of a linear: token count, sum, sum of squares (float64 on the block's device)."""

    def __init__(self):
        self.n = 0
        self.s = None
        self.ss = None

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).double()
        if self.s is None:
            self.s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.ss = torch.zeros_like(self.s)
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.square().sum(0)

    @property
    def mean(self):
        return self.s / self.n

    @property
    def var(self):  # unbiased sample variance per column
        return (self.ss - self.n * self.mean.square()) / max(1, self.n - 1)


def block_input_moments(model, structure: ModelStructure, calib_ids, roles, batch_size=1, device=None,
                        progress=True) -> List[Dict[str, _InputMoments]]:
    """One pass of the calibration pipeline over the (unchanged) model: per block, the input moments of
    the linears named by ``roles``."""
    from compress.calibration import run_sequential
    from compress.calibration.blocks import block_outputs
    from compress.calibration.runner import BlockResult

    out: List[Dict[str, _InputMoments]] = []

    def process(idx, block, inputs, dense):
        b = structure.blocks[idx]
        moments = {r: _InputMoments() for r in roles}
        handles = [b.modules[r].register_forward_pre_hook(lambda m, a, r=r: moments[r].add(a[0])) for r in roles]
        try:
            outs = block_outputs(block, inputs)
        finally:
            for h in handles:
                h.remove()
        out.append(moments)
        return BlockResult(outputs=outs)

    run_sequential(model, calib_ids, process, batch_size=batch_size, device=device, progress=progress,
                   desc="structured importance")
    return out


@register("activation")
def activation_scores(model, structure: ModelStructure, ctx) -> List[Dict]:
    metric = ctx.cfg.activation_metric
    roles = ("o", "down") if metric == "fluctuation" else tuple(structure.blocks[0].modules)
    moments = block_input_moments(model, structure, ctx.calib_ids, roles, ctx.batch_size, ctx.device, ctx.progress)
    ctx.moments = moments  # bias compensation uses the means
    res = []
    for b, mom in zip(structure.blocks, moments):
        if metric == "fluctuation":
            S = {}
            for r in ("o", "down"):
                w = weight_of(b, r).double()
                col = mom[r].var.clamp_min(0) * w.square().sum(0).to(mom[r].var.device)
                S[r] = col.unsqueeze(0)  # one row: the column scores (group_scores sums over rows)
            res.append(group_scores(b, S))
        else:  # wanda: |W_ij| * ||X_j||
            S = {r: weight_of(b, r).abs().double() * mom[r].ss.sqrt().to(weight_of(b, r).device).unsqueeze(0)
                 for r in roles}
            res.append(group_scores(b, S))
    return res


@register("taylor")
def taylor_scores(model, structure: ModelStructure, ctx) -> List[Dict]:
    """|W * dL/dW| with dL/dW summed over the calibration batches (full gradients: memory of one more copy of
    the block weights, plus the activations of one batch)."""
    params = {(b.index, r): b.modules[r].weight for b in structure.blocks for r in b.modules}
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in params.values():
        w.requires_grad_(True)
        w.grad = None
    was = model.training
    model.eval()
    ids = ctx.calib_ids
    dev = next(model.parameters()).device
    try:
        for s in tqdm(range(0, ids.shape[0], ctx.batch_size), desc="taylor gradients", disable=not ctx.progress):
            batch = ids[s:s + ctx.batch_size].to(dev)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            out.loss.backward()
        res = []
        for b in structure.blocks:
            S = {r: (b.modules[r].weight.detach() * b.modules[r].weight.grad).abs() for r in b.modules}
            res.append(group_scores(b, S))
    finally:
        for w in params.values():
            w.grad = None
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was)
    return res


@torch.no_grad()
def block_cosine(model, structure: Optional[ModelStructure], ctx) -> torch.Tensor:
    """Per block: 1 - mean over tokens of cos(input hidden state, output hidden state)."""
    from compress.calibration import run_sequential
    from compress.calibration.blocks import block_outputs
    from compress.calibration.runner import BlockResult

    scores = []

    def process(idx, block, inputs, dense):
        outs = block_outputs(block, inputs)
        tot = n = 0.0
        for h_in, h_out in zip(inputs.hidden, outs):
            c = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            tot += float((1 - c).sum())
            n += c.numel()
        scores.append(tot / n)
        return BlockResult(outputs=outs)

    run_sequential(model, ctx.calib_ids, process, batch_size=ctx.batch_size, device=ctx.device,
                   progress=ctx.progress, desc="block importance")
    return torch.tensor(scores, dtype=torch.float64)


ESTIMATORS["block"] = block_cosine
