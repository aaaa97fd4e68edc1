"""Integer grids as pure functions: fit scales and zero points, quantize, dequantize.

Conventions (those of compressed-tensors' ``int`` weights, so that a saved model dequantizes to exactly
the values computed here):

* ``bits`` b, signed codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``;
* symmetric: ``w ~ q * scale``, ``scale = max|w| / ((2^b - 1) / 2)``, no zero point;
* asymmetric: ``w ~ (q - zero) * scale``, ``scale = (max - min) / (2^b - 1)`` over a range that always
  contains 0 (so an exact zero, e.g. a pruned weight, is on the grid: ``q == zero``), ``zero`` an
  integer in the code range;
* parameters per output row and per group of ``group_size`` consecutive input columns (``-1``: one
  group per row, "per channel"). Scales are float32, zero points int.

``fit`` optionally searches a clipping factor per row and group (``mse=True``: the shrink of the range,
from 1.0 down to ``1 - grid * step``, that minimises the squared rounding error, as in GPTQ's ``mse``
option). A ``keep`` mask excludes weights from the fit (pruned weights, which stay exactly zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


def qrange(bits: int) -> Tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass
class GridSpec:
    bits: int
    symmetric: bool
    group_size: int = -1  # -1: per output channel
    mse: bool = False  # search a clipping factor per row and group
    mse_grid: int = 80
    mse_step: float = 0.01
    mse_norm: float = 2.4  # the error norm of the search (GPTQ's choice)

    def groups(self, cols: int) -> int:
        return 1 if self.group_size == -1 else cols // self.group_size

    def group_cols(self, cols: int) -> int:
        return cols if self.group_size == -1 else self.group_size


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: GridSpec):
    qmin, qmax = qrange(spec.bits)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / ((qmax - qmin) / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, None
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``w`` with per-row ``scale``/``zero`` broadcast along the last dim."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp_(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


@torch.no_grad()
def fit(w: torch.Tensor, spec: GridSpec, keep: Optional[torch.Tensor] = None):
    """Scale and zero point for every row of ``w`` (``[rows, n]``: one group). Returns ``(scale, zero)``
    of shape ``[rows, 1]`` (``zero`` None when symmetric). ``keep``: entries that count (pruned weights
    are left out of the range)."""
    w = w.float()
    if keep is not None:
        big = torch.finfo(w.dtype).max
        lo = torch.where(keep, w, torch.full_like(w, big)).amin(1, keepdim=True)
        hi = torch.where(keep, w, torch.full_like(w, -big)).amax(1, keepdim=True)
        empty = ~keep.any(1, keepdim=True)
        lo = torch.where(empty, torch.zeros_like(lo), lo)
        hi = torch.where(empty, torch.zeros_like(hi), hi)
    else:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, zero = _params_from_range(lo, hi, spec)
    if not spec.mse:
        return scale, zero
    best = torch.full_like(lo, float("inf"))
    mask = keep.float() if keep is not None else None
    for i in range(spec.mse_grid):
        p = 1 - i * spec.mse_step
        if p <= 0:
            break
        s, z = _params_from_range(lo * p, hi * p, spec)
        err = (fake_quant(w, s, z, spec.bits) - w).abs_().pow_(spec.mse_norm)
        if mask is not None:
            err.mul_(mask)
        err = err.sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        if zero is not None:
            zero = torch.where(better, z, zero)
    return scale, zero


@torch.no_grad()
def fit_groups(w: torch.Tensor, spec: GridSpec, keep: Optional[torch.Tensor] = None):
    """Parameters of every group of ``w`` (``[rows, cols]``): ``(scale, zero)`` of shape ``[rows, groups]``."""
    rows, cols = w.shape
    g = spec.group_cols(cols)
    out = [fit(w[:, a:a + g], spec, None if keep is None else keep[:, a:a + g]) for a in range(0, cols, g)]
    scale = torch.cat([s for s, _ in out], 1)
    zero = None if spec.symmetric else torch.cat([z for _, z in out], 1)
    return scale, zero


def expand(p: Optional[torch.Tensor], spec: GridSpec, cols: int) -> Optional[torch.Tensor]:
    """Per-group parameters ``[rows, groups]`` repeated over each group's columns: ``[rows, cols]``."""
    if p is None:
        return None
    return p.repeat_interleave(spec.group_cols(cols), dim=1)[:, :cols]


@torch.no_grad()
def rtn(w: torch.Tensor, spec: GridSpec, keep: Optional[torch.Tensor] = None):
    """Round to nearest: ``(dequantized weight, scale, zero)``; pruned entries (``keep`` False) stay 0."""
    w = w.float()
    scale, zero = fit_groups(w, spec, keep)
    deq = fake_quant(w, expand(scale, spec, w.shape[1]), expand(zero, spec, w.shape[1]), spec.bits)
    if keep is not None:
        deq = deq.masked_fill(~keep, 0)
    return deq, scale, zero


def bits_per_weight(spec: GridSpec, in_features: int, scale_bits: int = 32) -> float:
    """Storage bits per weight of a packed linear: the code, plus its share of the scale (float32 here)
    and, when asymmetric, of the zero point (``bits`` packed)."""
    group = in_features if spec.group_size == -1 else spec.group_size
    return spec.bits + (scale_bits + (0 if spec.symmetric else spec.bits)) / group


@torch.no_grad()
def on_grid(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: GridSpec,
            rows: int = 256) -> bool:
    """Every weight of ``w`` (``[out, in]``) equals its own code dequantized (exact in float32; a 16-bit weight
    holds the grid value rounded to its dtype). Checked ``rows`` rows at a time: it runs while a block's
    statistics are alive, so it must not hold copies of the whole weight."""
    rtol = 0.0 if w.dtype == torch.float32 else torch.finfo(w.dtype).eps
    for r in range(0, w.shape[0], rows):
        wr = w[r:r + rows].detach().float().cpu()
        sr = expand(scale[r:r + rows], spec, w.shape[1])
        zr = expand(zero[r:r + rows], spec, w.shape[1]) if zero is not None else None
        deq = dequantize(quantize(wr, sr, zr, spec.bits), sr, zr)
        if not (torch.equal(deq, wr) if rtol == 0 else torch.allclose(deq, wr, rtol=rtol, atol=0)):
            return False
    return True
