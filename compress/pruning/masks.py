"""Masks as pure functions of scores. ``True`` = keep. Higher score = more important.

All functions are vectorised (no Python loop over columns) and exact: an unstructured mask removes
exactly ``round(numel * sparsity)`` entries (per row or per matrix), an N:M mask keeps exactly N of
every M consecutive inputs in each row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Remove the ``sparsity`` fraction of lowest scores, per row or over the whole matrix.

    Ties are broken by position (stable sort), so the result is deterministic.
    """
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(round(flat.shape[-1] * sparsity))
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # kthvalue (selection) is much cheaper than a sort; fall back to a stable sort only for rows
    # where ties straddle the threshold, so that exactly k entries go.
    thresh = torch.kthvalue(flat.float(), k, dim=-1, keepdim=True).values
    keep = flat.float() > thresh
    bad = (~keep).sum(-1) != k
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        sub = torch.ones_like(flat[rows], dtype=torch.bool)
        idx = torch.sort(flat[rows], dim=-1, stable=True).indices[:, :k]
        keep[rows] = sub.scatter_(-1, idx, False)
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of each row.

    A trailing partial group (columns not divisible by ``m``) keeps ``min(n, size)`` entries.
    """
    rows, cols = scores.shape
    pad = (-cols) % m
    s = scores.float()
    if pad:
        s = torch.cat([s, torch.full((rows, pad), float("-inf"), device=s.device)], dim=1)
    g = s.view(rows, -1, m)
    keep = torch.topk(g, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True).view(rows, -1)
    mask = mask[:, :cols]
    if pad:  # padded -inf entries may have been "kept"; re-rank the partial group among real entries
        tail = cols - (cols % m)
        r = cols - tail
        keep_tail = torch.topk(scores[:, tail:].float(), min(n, r), dim=-1).indices + tail
        mask[:, tail:] = False
        mask.scatter_(1, keep_tail, True)
    return mask


def make_mask(scores: torch.Tensor, sparsity: float, nm: Optional[Tuple[int, int]] = None, per_row: bool = True) -> torch.Tensor:
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, per_row=per_row)


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every complete group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    full = cols - cols % m
    nz = (weight[:, :full] != 0).view(rows, -1, m).sum(-1)
    return bool((nz <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()
