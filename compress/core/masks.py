"""Masks as pure functions of scores. ``True`` = keep. Higher score = more important.

All functions are vectorised (no Python loop over columns) and exact: an unstructured mask removes
exactly ``round(numel * sparsity)`` entries (per row or per matrix), an N:M mask keeps exactly N of
every M consecutive inputs in each row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


ROW_CHUNK_ELEMENTS = 1 << 22  # per-row masks are selected in chunks of rows of about this many scores


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Remove the ``sparsity`` fraction of lowest scores, per row or over the whole matrix.

    Ties are broken by position (stable sort), so the result is deterministic. Per row, the selection
    runs over chunks of rows (``kthvalue`` keeps a copy of its input and int64 indices, three times the
    scores' size), so its working memory stays bounded; the mask is the same.
    """
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if per_row and scores.dim() == 2 and scores.numel() > ROW_CHUNK_ELEMENTS:
        step = max(1, ROW_CHUNK_ELEMENTS // scores.shape[1])
        return torch.cat([_select(scores[r:r + step], sparsity, True) for r in range(0, scores.shape[0], step)])
    return _select(scores, sparsity, per_row)


def _select(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(round(flat.shape[-1] * sparsity))
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # kthvalue (selection) is much cheaper than a sort. Entries equal to the threshold are pruned in
    # position order until exactly k are gone (the same tie rule as a stable sort), without sorting.
    f = flat.float()
    thresh = torch.kthvalue(f, k, dim=-1, keepdim=True).values
    prune = f <= thresh
    if bool((prune.sum(-1) == k).all()):  # no ties at the threshold (the usual case): done
        return (~prune).view_as(scores)
    below = f < thresh
    tied = f == thresh
    need = k - below.sum(-1, keepdim=True)
    prune = below | (tied & (torch.cumsum(tied.int(), dim=-1) <= need))
    return (~prune).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep ``n`` of every ``m`` consecutive columns of each row: the ``m - n`` lowest scores are pruned.

    Pruning the lowest (rather than keeping the highest) is the reference implementations' rule, which
    matters when scores tie (dequantized 4-bit weights tie often). A trailing partial group (columns not
    divisible by ``m``) keeps ``min(n, size)`` entries.
    """
    rows, cols = scores.shape
    pad = (-cols) % m
    s = scores.float()
    if pad:  # -inf padding is pruned first, so a partial group of r real entries keeps min(n, r)
        s = torch.cat([s, torch.full((rows, pad), float("-inf"), device=s.device)], dim=1)
    g = s.view(rows, -1, m)
    drop = torch.topk(g, m - n, dim=-1, largest=False).indices
    mask = torch.ones_like(g, dtype=torch.bool).scatter_(-1, drop, False).view(rows, -1)
    return mask[:, :cols]


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
