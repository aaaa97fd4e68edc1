"""What every structural importance shares: the context it gets, what it returns, and the fold of
per-weight scores into per-group scores.

An importance (one module each, registered as kind ``importance``) returns, per block,
``{"heads": [n_heads], "kv": [n_kv], "channels": [intermediate]}`` (the q/o part of each query head, the
k/v part of each KV head, each MLP channel; width importances), or one score per block (depth), or the
groups it kept itself (LoRAPrune prunes while it trains). Higher = keep. :func:`group_scores` sums the
weight scores of each group inside each role and normalises each role's vector to sum 1 (so q, k, v, o,
gate, up and down weigh alike whatever their scale); :func:`attn_scores` folds heads and KV heads into the
unit being removed (KV groups or query heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from compress.calibration.roles import BlockStructure, ModelStructure


@dataclass
class ImportanceContext:
    model: Any
    structure: Optional[ModelStructure]  # None for depth importances
    cfg: Any  # StructuredConfig
    calib_ids: Optional[torch.Tensor] = None
    batch_size: int = 1
    device: Any = "cpu"
    progress: bool = True
    plan: Any = None  # the WidthPlan (width importances)
    tokenizer: Any = None
    train_cfg: Any = None  # the train group's LoRA settings (LoRAPrune)
    out_dir: Optional[Path] = None


@dataclass
class Importance:
    """What an importance returns: ``scores`` per block (width: group score dicts; depth: one tensor), or
    ``keeps`` (the groups it kept itself); ``model`` when it replaced the model (LoRA merged); ``means``
    per block and role (input means, for FLAP's bias compensation); ``info`` and ``sections`` for the record."""

    scores: Any = None
    keeps: Optional[List] = None
    model: Any = None
    means: Optional[List[Dict[str, torch.Tensor]]] = None
    info: Dict = field(default_factory=dict)
    sections: Dict = field(default_factory=dict)


class ImportanceMethod:
    """Base of the importances: ``unit`` (width | depth), ``needs_calibration``, and whether its channel scores
    can be ranked across blocks (``global_ranking``, for non-uniform widths)."""

    unit = "width"
    needs_calibration = True
    global_ranking = False
    # its scores come from statistics summed over the calibration tokens only (not from block outputs nor from
    # training), so with several ranks, each on a share of the samples, the summed statistics give every
    # rank the same scores
    statistics_only = False

    def __call__(self, ictx: ImportanceContext) -> Importance:
        raise NotImplementedError


def _normalise(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    s = v.sum()
    return v / s if s > 0 else v


def group_scores(b: BlockStructure, S: Dict[str, torch.Tensor], post: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """Per-group sums of per-weight scores ``S[role]`` (each ``[rows, in]`` like the role's weight),
    normalised per role. Roles missing from ``S`` contribute nothing. ``post`` (e.g. ``torch.square``) maps
    each role's group sums before the normalisation (for signed weight scores)."""
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


def role_modules(b: BlockStructure) -> Dict[str, torch.nn.Module]:
    """Module name (relative to the block) -> module, once per module (fused roles share one)."""
    return {b.pattern.roles[r]: m for r, m in b.modules.items()}
