"""One ordered-column OBS loop (Optimal Brain Surgeon with lazy batch updates) for SparseGPT, GPTQ and
the joint mode.

Columns (input features) are processed in order. Each column is replaced by its compressed version
(pruned to zero, quantized, or both) and the error, divided by the diagonal of the upper Cholesky factor
``U`` of the damped ``H^-1``, is spread over the columns not yet processed: within a block of columns at
once per column, to later blocks in one matrix product per block (the lazy batch update).

Two hooks decide what "compressed" means:

* a **mask** (``sparsity`` / ``nm`` chosen inside the loop from ``w^2 / U_ii^2`` on the updated weights,
  as in SparseGPT; or ``keep``, a fixed mask, e.g. from an earlier prune stage, whose zeros stay zero);
* a **quantizer** (:class:`compress.core.grid.GridSpec`): the grid parameters of a group are fitted
  when the loop reaches the group's first column, on the updated weights of the group's kept entries
  (``static_groups``: fitted on the original weights before the loop, which act-order needs so that
  every column keeps its own group's parameters and no per-row group index is stored).

Pruned entries are exactly zero and stay so; with a quantizer, kept entries are exactly on the grid.
The loop runs on the transposed weight so that every step touches contiguous memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from compress.core.config import choice, positive
from compress.core.errors import ConfigError
from compress.core.grid import fake_quant, fit
from compress.core.masks import nm_mask, unstructured_mask


@dataclass
class OBSConfig:
    """The column loop's settings, a mixin of config fields for the methods that run it."""

    blocksize: int = 128  # columns per lazy batch update
    percdamp: float = 0.01  # relative damping of H (raised automatically if H is not positive definite)
    damp_mode: str = "mean"  # mean (reference: percdamp * mean diag H) | median (robust to massive activations)

    def validate_obs(self) -> None:
        positive(self.key("blocksize"), self.blocksize)
        if not isinstance(self.percdamp, (int, float)) or isinstance(self.percdamp, bool) or not self.percdamp >= 0:
            raise ConfigError(f"{self.key('percdamp')}={self.percdamp!r} is not valid: it must be >= 0")
        choice(self.key("damp_mode"), self.damp_mode, ("mean", "median"))


@dataclass
class ObsResult:
    weight: torch.Tensor  # [rows, cols] float32 (a view of the transposed working copy)
    keep: Optional[torch.Tensor] = None  # [rows, cols] bool, when a mask was chosen or given
    scale: Optional[torch.Tensor] = None  # [rows, groups]
    zero: Optional[torch.Tensor] = None  # [rows, groups]


def _block_size(blocksize: int, *multiples: int) -> int:
    """The column block rounded down to a multiple of every grouping (N:M groups, quantization groups),
    so that no group straddles two blocks."""
    for m in multiples:
        if m and m > 1:
            blocksize = max(m, blocksize - blocksize % m)
    return blocksize


@torch.no_grad()
def obs_compress(W: torch.Tensor, U: torch.Tensor, blocksize: int = 128, *, sparsity: float = 0.0,
                 nm: Optional[Tuple[int, int]] = None, keep: Optional[torch.Tensor] = None, quant=None,
                 qparams: Optional[tuple] = None, dead: Optional[torch.Tensor] = None) -> ObsResult:
    """Compress ``W`` (``[rows, cols]``, any float dtype) column by column (see the module docstring).

    ``U``: upper Cholesky factor of the damped inverse Hessian, in the processing order (permute ``H``
    and ``W``'s columns together for act-order before calling). ``quant``: a
    :class:`~compress.core.grid.GridSpec`; ``qparams``: ``(scale, zero, col_group)`` fitted beforehand
    (static groups: ``scale``/``zero`` ``[rows, groups]``, ``col_group[c]`` the group of processing-order
    column ``c``), else each group's parameters are fitted when the loop reaches it (contiguous groups).
    ``dead``: inputs never activated (their weights are zeroed first, as in the reference
    implementations). Returns an :class:`ObsResult`.
    """
    Wt = W.float().t().contiguous()  # [cols, rows]
    cols, rows = Wt.shape
    if dead is not None:
        Wt[dead] = 0
    choose = keep is None and (sparsity > 0 or nm is not None)
    keep_t = keep.t().contiguous() if keep is not None else (torch.ones_like(Wt, dtype=torch.bool) if choose else None)
    gs = 0
    scale = zero = col_group = None
    static = qparams is not None
    if quant is not None:
        gs = cols if quant.whole_rows else quant.group_size
        if cols % gs:
            raise ValueError(f"group size {gs} does not divide the {cols} input columns")
        if static:
            scale, zero, col_group = qparams
            col_group = col_group.tolist()
        else:
            scale = torch.empty(rows, cols // gs, dtype=torch.float32, device=Wt.device)
            zero = None if quant.symmetric else torch.empty(rows, cols // gs, dtype=torch.float32, device=Wt.device)
            col_group = [c // gs for c in range(cols)]
    blocksize = _block_size(blocksize, nm[1] if nm else 0, gs if quant is not None and gs < cols and not static else 0)
    if choose and nm is not None and quant is not None and not static and gs < cols and gs % nm[1]:
        raise ValueError(f"N:M with M={nm[1]} needs a quantization group size that is a multiple of M, got {gs}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()  # [count, rows]
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        if choose and nm is None:
            keep_t[i1:i2] = unstructured_mask(W1.square() / d.square().unsqueeze(1), sparsity, per_row=False)
        # pruning only: err_i = W1[i] * pruned_i / d_i, two kernels per column, zeros applied at the block's end
        pruned1 = (~keep_t[i1:i2]).to(W1.dtype) if quant is None and keep_t is not None else None
        w_rows, e_rows = W1.unbind(0), Err1.unbind(0)
        p_rows = pruned1.unbind(0) if pruned1 is not None else None
        d_list = d.tolist()
        for i in range(count):
            c = i1 + i
            if choose and nm is not None and i % nm[1] == 0:
                j = min(i + nm[1], count)
                keep_t[c:c + j - i] = nm_mask((W1[i:j].square() / d[i:j].square().unsqueeze(1)).t(), *nm).t()
                if pruned1 is not None:
                    pruned1[i:j] = ~keep_t[c:c + j - i]
            if quant is None:
                if p_rows is not None:
                    torch.mul(w_rows[i], p_rows[i], out=e_rows[i]).div_(d_list[i])
                    W1[i:].addr_(U1[i, i:], e_rows[i], alpha=-1)
                continue
            if not static and c % gs == 0:  # a new group: fit on the updated weights of its kept entries
                g = c // gs
                s_, z_ = fit(W1[i:i + gs].t(), quant, None if keep_t is None else keep_t[c:c + gs].t())
                scale[:, g:g + 1] = s_
                if zero is not None:
                    zero[:, g:g + 1] = z_
            g = col_group[c]
            w = w_rows[i]
            q = fake_quant(w.unsqueeze(1), scale[:, g:g + 1], None if zero is None else zero[:, g:g + 1],
                           quant.bits, quant.type).squeeze(1)
            if keep_t is not None:
                q = torch.where(keep_t[c], q, 0.0)
            torch.sub(w, q, out=e_rows[i]).div_(d_list[i])
            W1[i:].addr_(U1[i, i:], e_rows[i], alpha=-1)
            W1[i] = q
        if quant is None and keep_t is not None:
            W1.mul_(keep_t[i1:i2])  # exact zeros where pruned
        Wt[i1:i2] = W1
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)
    return ObsResult(Wt.t(), None if keep_t is None else keep_t.t(), scale, zero)
