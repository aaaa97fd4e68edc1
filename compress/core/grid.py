"""Integer grids as pure functions: fit scales and zero points, quantize, dequantize.

Conventions (those of compressed-tensors' ``int`` weights, so that a saved model dequantizes to exactly
the values computed here):

* ``bits`` b, signed codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``;
* symmetric: ``w ~ q * scale``, ``scale = max|w| / ((2^b - 1) / 2)``, no zero point;
* asymmetric: ``w ~ (q - zero) * scale``, ``scale = (max - min) / (2^b - 1)`` over a range that always
  contains 0 (so an exact zero, e.g. a pruned weight, is on the grid: ``q == zero``), ``zero`` an
  integer in the code range;
* parameters per output row and per group of ``group_size`` consecutive input columns (``-1``: one
  group per row, "per channel"; ``0``: one scale for the whole tensor, "per tensor", kept as ``[rows, 1]``
  equal values). Scales are float32, zero points int.
* ``type="float"`` (``bits=8``): FP8 E4M3 (compressed-tensors ``float`` weights): ``w ~ fp8(w / scale) *
  scale`` with ``scale = max|w| / 448``, symmetric only; the codes are the float8 values themselves.

Activations (:class:`ActSpec`, :func:`act_fake_quant`) use the same two formats at 8 bits, symmetric, per
token (one scale per row of the input) or per tensor, with the scale computed from the input itself
(dynamic) or fixed from calibration (static), as compressed-tensors' ``input_activations`` do.

``fit`` optionally searches a clipping factor per row and group (``mse=True``: the shrink of the range,
from 1.0 down to ``1 - grid * step``, that minimises the squared rounding error, as in GPTQ's ``mse``
option). A ``keep`` mask excludes weights from the fit (pruned weights, which stay exactly zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


FP8_MAX = 448.0  # largest finite float8 E4M3 (fn) value


def qrange(bits: int) -> Tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass
class GridSpec:
    bits: int
    symmetric: bool
    group_size: int = -1  # -1: per output channel; 0: per tensor
    mse: bool = False  # search a clipping factor per row and group
    mse_grid: int = 80
    mse_step: float = 0.01
    mse_norm: float = 2.4  # the error norm of the search (GPTQ's choice)
    type: str = "int"  # int | float (FP8 E4M3, bits 8, symmetric)

    @property
    def whole_rows(self) -> bool:
        """One group per row (per channel or per tensor)."""
        return self.group_size <= 0

    @property
    def per_tensor(self) -> bool:
        return self.group_size == 0

    def groups(self, cols: int) -> int:
        return 1 if self.whole_rows else cols // self.group_size

    def group_cols(self, cols: int) -> int:
        return cols if self.whole_rows else self.group_size

    @property
    def strategy(self) -> str:
        return "tensor" if self.per_tensor else "channel" if self.group_size == -1 else "group"


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: GridSpec):
    if spec.type == "float":
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / FP8_MAX
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
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


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (already divided by its scale) rounded to the nearest float8 E4M3 value, saturated at +-448,
    returned in ``x``'s dtype (float32 holds every E4M3 value exactly)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
             type: str = "int") -> torch.Tensor:
    """Codes (as float) of ``w`` with per-row ``scale``/``zero`` broadcast along the last dim: integers, or
    the float8 values themselves when ``type="float"``."""
    if type == "float":
        return fp8_round(w / scale)
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return q.clamp_(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
               type: str = "int") -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits, type), scale, zero)


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
        err = (fake_quant(w, s, z, spec.bits, spec.type) - w).abs_().pow_(spec.mse_norm)
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
    """Parameters of every group of ``w`` (``[rows, cols]``): ``(scale, zero)`` of shape ``[rows, groups]``
    (per tensor: ``[rows, 1]``, every row the same)."""
    rows, cols = w.shape
    if spec.per_tensor:
        s, z = fit(w.reshape(1, -1), spec, None if keep is None else keep.reshape(1, -1))
        return s.expand(rows, 1).contiguous(), None if z is None else z.expand(rows, 1).contiguous()
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
    deq = fake_quant(w, expand(scale, spec, w.shape[1]), expand(zero, spec, w.shape[1]), spec.bits, spec.type)
    if keep is not None:
        deq = deq.masked_fill(~keep, 0)
    return deq, scale, zero


def bits_per_weight(spec: GridSpec, in_features: int, scale_bits: int = 32) -> float:
    """Storage bits per weight of a packed linear: the code, plus its share of the scale (float32 here)
    and, when asymmetric, of the zero point (``bits`` packed)."""
    if spec.per_tensor:
        return float(spec.bits)  # one scale for the whole tensor: nothing per weight
    group = in_features if spec.whole_rows else spec.group_size
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
        deq = dequantize(quantize(wr, sr, zr, spec.bits, spec.type), sr, zr)
        if not (torch.equal(deq, wr) if rtol == 0 else torch.allclose(deq, wr, rtol=rtol, atol=0)):
            return False
    return True


# ------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActSpec:
    """8-bit input activations of a linear: ``type`` int (int8, codes in [-128, 127], ``scale = max|x| /
    127.5``, the weights' symmetric convention) or float (FP8 E4M3, ``scale = max|x| / 448``); ``strategy``
    token (a scale per row of the input) or tensor; ``dynamic`` scales computed from each input, else a
    static per-tensor scale fixed from calibration."""

    type: str = "int"
    strategy: str = "token"
    dynamic: bool = True
    bits: int = 8

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.type == "float" else (2 ** self.bits - 1) / 2

    def label(self) -> str:
        return (f"{'fp8' if self.type == 'float' else 'int8'} {self.strategy} "
                f"{'dynamic' if self.dynamic else 'static'}")


def act_scale(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """The scale of ``x`` (``[..., features]``) under ``spec``: per token ``[..., 1]``, per tensor ``[]``."""
    a = x.detach().abs()
    amax = a.amax(-1, keepdim=True) if spec.strategy == "token" else a.amax()
    s = amax.float() / spec.qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def act_fake_quant(x: torch.Tensor, spec: ActSpec, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` quantized to 8 bits and dequantized (what a W8A8 / FP8 kernel computes with, simulated in
    float). ``scale``: a static scale (per tensor), else computed from ``x``."""
    s = act_scale(x, spec) if scale is None else scale.to(x.device)
    xs = x.float() / s
    if spec.type == "float":
        q = fp8_round(xs)
    else:
        lo, hi = qrange(spec.bits)
        q = torch.round(xs).clamp_(lo, hi)
    return (q * s).to(x.dtype)
